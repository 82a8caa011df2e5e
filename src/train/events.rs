//! TensorBoard event files, so that `tensorboard --logdir runs/stages/train` shows a run's curves.
//!
//! The format is TensorFlow's record file: each record is its length (u64, little-endian), the
//! masked CRC-32C of those 8 bytes, the bytes of an `Event` protocol buffer, and their masked
//! CRC-32C. The few protobuf fields pipe writes are encoded here by hand (an `Event` with its
//! `wall_time`, `step` and either `file_version` or a `Summary` of `simple_value` scalars), which
//! is all TensorBoard's scalar dashboard reads.
//!
//! The file is a digested stage output, so it must be the same bytes for the same numbers: each
//! event's `wall_time` is its step (as seconds since the epoch), never the clock. TensorBoard's
//! default axis is the step; the stage's real duration is in the run record.

/// The name TensorBoard recognises (`tfevents` in it); one per train stage.
pub const EVENTS_FILE: &str = "events.out.tfevents.pipe";

/// The scalars of one line of the train stage's logs, at its step.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalars {
    /// The line's `step`.
    pub step: u64,
    /// `(tag, value)`: `train/<field>` for a line of `train_log.jsonl`, `eval/<field>` for one of
    /// `metrics.jsonl`, every number the line holds but its step, in the line's order.
    pub values: Vec<(String, f64)>,
}

/// Every number the train stage logged, as dashboards show them: the lines of `train_log.jsonl`
/// (`steps`) and `metrics.jsonl` (`evaluations`) in step order, a step's training line before the
/// evaluation that follows it. Non-numbers (early stopping's `best`, a missing `grad_norm`) are
/// left out.
pub fn logged_scalars(steps: &[serde_json::Value], evaluations: &[serde_json::Value]) -> Vec<Scalars> {
    let lines = steps.iter().map(|l| ("train", l)).chain(evaluations.iter().map(|l| ("eval", l)));
    let mut scalars: Vec<Scalars> = lines
        .map(|(prefix, line)| Scalars {
            step: line["step"].as_u64().unwrap_or(0),
            values: line
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(field, _)| *field != "step")
                .filter_map(|(field, value)| Some((format!("{prefix}/{field}"), value.as_f64()?)))
                .collect(),
        })
        .collect();
    scalars.sort_by_key(|s| s.step); // stable: training lines stay before evaluations
    scalars
}

/// The event file of `scalars`.
pub fn event_file(scalars: &[Scalars]) -> Vec<u8> {
    let mut file = EventFile::new();
    for line in scalars {
        file.scalars(line.step, line.values.iter().map(|(tag, value)| (tag.as_str(), *value)));
    }
    file.into_bytes()
}

/// An event file being assembled in memory: the version record first, then scalar events.
struct EventFile {
    bytes: Vec<u8>,
}

impl EventFile {
    /// A file holding only the `file_version` event TensorBoard expects first.
    fn new() -> Self {
        let mut event = Vec::new();
        wall_time_and_step(&mut event, 0);
        bytes_field(&mut event, 3, b"brain.Event:2");
        let mut file = Self { bytes: Vec::new() };
        file.record(&event);
        file
    }

    /// One event at `step` holding `scalars` as `(tag, value)` (TensorBoard keeps them as f32).
    fn scalars<'a>(&mut self, step: u64, scalars: impl IntoIterator<Item = (&'a str, f64)>) {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut entry = Vec::new();
            bytes_field(&mut entry, 1, tag.as_bytes());
            entry.push(2 << 3 | 5); // simple_value: a 32-bit float
            entry.extend_from_slice(&(value as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &entry);
        }
        let mut event = Vec::new();
        wall_time_and_step(&mut event, step);
        bytes_field(&mut event, 5, &summary);
        self.record(&event);
    }

    /// The file's bytes.
    fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    fn record(&mut self, data: &[u8]) {
        let length = (data.len() as u64).to_le_bytes();
        self.bytes.extend_from_slice(&length);
        self.bytes.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
        self.bytes.extend_from_slice(data);
        self.bytes.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    }
}

/// `Event.wall_time` (field 1, a double: the step, see the module docs) and `Event.step` (field 2).
fn wall_time_and_step(event: &mut Vec<u8>, step: u64) {
    event.push(1 << 3 | 1);
    event.extend_from_slice(&(step as f64).to_le_bytes());
    event.push(2 << 3);
    varint(event, step);
}

/// A length-delimited protobuf field (a string or an embedded message).
fn bytes_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7F) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// CRC-32C (Castagnoli), rotated and offset as TensorFlow's records store it.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, &byte| TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_frame_their_events_with_checked_lengths() {
        let mut file = EventFile::new();
        file.scalars(300, [("train/loss", 0.5), ("train/lr", 2e-5)]);
        let bytes = file.into_bytes();
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let length = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()),
                masked_crc32c(&bytes[at..at + 8])
            );
            let data = &bytes[at + 12..at + 12 + length];
            let crc = u32::from_le_bytes(bytes[at + 12 + length..at + 16 + length].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            events.push(data.to_vec());
            at += 16 + length;
        }
        assert_eq!(events.len(), 2);
        assert!(events[0].ends_with(b"brain.Event:2"));
        // wall_time 300.0, step 300 (varint 0xAC 0x02), then the summary.
        assert_eq!(&events[1][..1], &[0x09]);
        assert_eq!(&events[1][1..9], &300f64.to_le_bytes());
        assert_eq!(&events[1][9..12], &[0x10, 0xAC, 0x02]);
        let loss = [&[0x0A, 10][..], b"train/loss", &[0x15], &0.5f32.to_le_bytes()].concat();
        assert!(events[1].windows(loss.len()).any(|w| w == loss.as_slice()));
    }
}

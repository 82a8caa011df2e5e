//! `pipe gc`: frees the local store of stage outputs that no recent run refers to.
//!
//! A stage is deleted when it finished longer ago than the given age and no run record created
//! since then names it; a stage whose lock a run holds is never touched. Records themselves are
//! kept (they are small and meant for git): a run whose stages were collected can be pulled from
//! a remote or reproduced.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use crate::plan::StageKind;
use crate::records::Record;
use crate::store::{MANIFEST, Store, StoreError};

/// What `gc` deleted (or would delete, on a dry run) and kept.
#[derive(Debug, Default, Clone)]
pub struct Collection {
    /// `(kind, key, bytes)` of each stage deleted.
    pub deleted: Vec<(String, String, u64)>,
    /// Stages kept: referred to by a recent record, or finished recently.
    pub kept: usize,
    /// Stages left alone because a run holds their lock.
    pub locked: Vec<(String, String)>,
}

impl Collection {
    /// Bytes freed.
    pub fn bytes(&self) -> u64 {
        self.deleted.iter().map(|(_, _, bytes)| bytes).sum()
    }
}

/// Parses an age such as `30d`, `12h`, `90m`, `45s` or `0s`.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let bad =
        || format!("`{text}` is not an age: expected a whole number and a unit, as in 30d, 12h, 90m or 0s");
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(unit_at);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    number.checked_mul(seconds).map(Duration::from_secs).ok_or_else(bad)
}

/// Deletes (or, with `dry_run`, lists) the stages of `store` that finished more than `age` ago
/// and that no record created within `age` refers to.
pub fn collect(store: &Store, age: Duration, dry_run: bool) -> Result<Collection, StoreError> {
    let now = SystemTime::now();
    let recent = |time: SystemTime| now.duration_since(time).unwrap_or_default() < age;
    let mut referenced = BTreeSet::new();
    for id in store.record_ids()? {
        // A record that does not parse protects nothing it cannot name; `pipe verify` reports it.
        let Ok(record) = Record::read(store, &id) else { continue };
        let created = parse_rfc3339(record.text("created"))
            .or_else(|| std::fs::metadata(store.record_path(&id)).and_then(|m| m.modified()).ok());
        if !created.is_some_and(recent) {
            continue;
        }
        for kind in StageKind::ALL {
            if let Some(key) = record.stage(kind.name()).and_then(|s| s.get("key")).and_then(|k| k.as_str()) {
                referenced.insert((kind.name().to_string(), key.to_string()));
            }
        }
    }
    let mut collection = Collection::default();
    for (kind, key) in store.stage_keys()? {
        let dir = store.stage_dir(&kind, &key);
        let finished = std::fs::metadata(dir.join(MANIFEST)).and_then(|m| m.modified()).ok();
        if referenced.contains(&(kind.clone(), key.clone())) || finished.is_some_and(recent) {
            collection.kept += 1;
            continue;
        }
        let bytes = walkdir::WalkDir::new(&dir)
            .into_iter()
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        if dry_run || store.remove_stage(&kind, &key)? {
            collection.deleted.push((kind, key, bytes));
        } else {
            collection.locked.push((kind, key));
        }
    }
    Ok(collection)
}

/// `YYYY-MM-DDTHH:MM:SSZ` (as records write `created`) as a time.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let field = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hour, minute, second) = (field(11..13)?, field(14..16)?, field(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Days since 1970-01-01 from a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_and_nonsense_does_not() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "d", "10", "10y", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn record_times_parse_like_the_engine_writes_them() {
        let t = parse_rfc3339("2026-11-27T16:40:05Z").unwrap();
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_795_797_605);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}

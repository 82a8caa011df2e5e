//! Reading the full SST-2 train set (67,349 rows) as CSV, as JSON Lines and as Parquet: the
//! columns a pipeline needs, as the tokenize stage reads them. The JSON Lines and Parquet copies
//! are written here from the CSV (Parquet as pyarrow writes by default: Snappy, one row group, plus
//! a file in row groups of 10,000 rows).
//!
//! `cargo bench --bench formats [-- REPEATS]`. Prints each reader's median over REPEATS (7) reads.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use pipe::data::{LabeledTexts, read_labeled};

fn main() -> anyhow::Result<()> {
    let repeats: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let csv = root.join("data/sst2/train.csv");
    let data = read_labeled(&csv, None, "text", "label")?;
    let dir = tempfile::tempdir()?;

    let jsonl = dir.path().join("train.jsonl");
    let mut lines = String::new();
    for (text, label) in data.texts.iter().zip(&data.labels) {
        lines.push_str(&serde_json::json!({"text": text, "label": label}).to_string());
        lines.push('\n');
    }
    std::fs::write(&jsonl, lines)?;
    let one_group = dir.path().join("train.parquet");
    write_parquet(&data, &one_group, 1 << 20)?;
    let groups = dir.path().join("train-groups.parquet");
    write_parquet(&data, &groups, 10_000)?;

    println!("rows: {}, median of {repeats} reads", data.len());
    println!("| file | bytes | median s | rows/s | vs CSV |");
    println!("|---|---|---|---|---|");
    let mut csv_median = None;
    for (name, path) in
        [("CSV", &csv), ("JSON Lines", &jsonl), ("Parquet", &one_group), ("Parquet, 7 row groups", &groups)]
    {
        let mut times = Vec::new();
        for _ in 0..repeats {
            let start = Instant::now();
            let read = read_labeled(path, None, "text", "label")?;
            times.push(start.elapsed().as_secs_f64());
            assert_eq!((read.texts.len(), &read.labels), (data.len(), &data.labels), "{name}");
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let csv_median = *csv_median.get_or_insert(median);
        println!(
            "| {name} | {} | {median:.4} | {:.0} | {:.2}x |",
            std::fs::metadata(path)?.len(),
            data.len() as f64 / median,
            csv_median / median
        );
    }
    Ok(())
}

/// `data` as a Parquet file of two string columns, Snappy-compressed, `rows_per_group` rows to a
/// row group.
fn write_parquet(data: &LabeledTexts, path: &Path, rows_per_group: usize) -> anyhow::Result<()> {
    let batch = RecordBatch::try_from_iter([
        ("text", Arc::new(StringArray::from(data.texts.clone())) as ArrayRef),
        ("label", Arc::new(StringArray::from(data.labels.clone())) as ArrayRef),
    ])?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(rows_per_group))
        .build();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path)?, batch.schema(), Some(properties))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

//! Tokenization throughput over the full SST-2 train set (67,349 rows), as the tokenize stage does
//! it: truncation at 128, no padding, rows in parallel.
//!
//! `cargo bench --bench tokenize` (needs `scripts/fetch-model.sh`). Prints the median of 5 runs.

use std::path::Path;
use std::time::Instant;

use pipe::data::{TextEncoder, read_labeled};

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { pipe::runtime::configure() }?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tokenizer = root.join("models/all-MiniLM-L6-v2/tokenizer.json");
    if !tokenizer.is_file() {
        println!("SKIPPED: no tokenizer at {} (run scripts/fetch-model.sh)", tokenizer.display());
        return Ok(());
    }
    let start = Instant::now();
    let data = read_labeled(&root.join("data/sst2/train.csv"), None, "text", "label")?;
    let read = start.elapsed().as_secs_f64();
    let encoder = TextEncoder::from_file(&tokenizer, 128, Default::default())?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let ids = encoder.encode_all(&data.texts)?;
        times.push(start.elapsed().as_secs_f64());
        assert_eq!(ids.len(), data.texts.len());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"rows\": {}, \"csv_read_s\": {read:.4}, \"tokenize_s\": {median:.4}, \"rows_per_s\": {:.0}, \"threads\": {}}}",
        data.texts.len(),
        data.texts.len() as f64 / median,
        rayon::current_num_threads()
    );
    Ok(())
}

//! Scoring and running a causal LM: the mean next-token loss of tokenized sequences, generation
//! (greedy, or seeded sampling with temperature and nucleus), and exact match of greedy
//! generations against completions.

use candle_core::Result;

use crate::model::{CausalLm, KvCache, Mode};

/// The mean next-token loss over `rows`, each predicted from position `loss_from[r]` on, in
/// batches of `batch_size` rows (in row order): every predicted token counts once. Also returns
/// how many tokens were predicted. The one computation behind evaluations during training and the
/// evaluate stage.
pub fn lm_loss(
    model: &CausalLm,
    rows: &[Vec<u32>],
    loss_from: &[u32],
    batch_size: usize,
) -> Result<(f64, usize)> {
    let (mut total, mut count) = (0f64, 0usize);
    let indices: Vec<usize> = (0..rows.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let ids: Vec<&[u32]> = chunk.iter().map(|&r| rows[r].as_slice()).collect();
        let from: Vec<usize> = chunk.iter().map(|&r| loss_from[r] as usize).collect();
        let (loss, n) = model.loss(&ids, &from, Mode::Infer)?;
        if n > 0 {
            total += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * n as f64;
            count += n;
        }
    }
    Ok((if count == 0 { f64::NAN } else { total / count as f64 }, count))
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most probable token (the first on ties).
    Greedy,
    /// Drawn from the distribution at `temperature`, cut to the most probable tokens whose
    /// probabilities sum to `top_p` (nucleus sampling), with draws from `seed`.
    Sample { temperature: f64, top_p: f64, seed: u64 },
}

/// Generates up to `max_new_tokens` tokens after `prompt`, stopping after any of `stop` (which is
/// kept). The same inputs give the same tokens on any machine and thread count.
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    sampling: Sampling,
) -> Result<Vec<u32>> {
    Ok(generate_many(model, &[(prompt, max_new_tokens)], stop, sampling)?.remove(0))
}

/// [`generate`] for several `(prompt, max_new_tokens)` requests at once, their steps packed into
/// each product: each request's tokens are those it gets alone.
pub fn generate_many(
    model: &CausalLm,
    requests: &[(&[u32], usize)],
    stop: &[u32],
    sampling: Sampling,
) -> Result<Vec<Vec<u32>>> {
    let mut out = vec![Vec::new(); requests.len()];
    let mut active: Vec<usize> = (0..requests.len()).filter(|&i| requests[i].1 > 0).collect();
    let mut caches: Vec<KvCache> = active.iter().map(|_| model.new_cache()).collect();
    let mut inputs: Vec<Vec<u32>> = active.iter().map(|&i| requests[i].0.to_vec()).collect();
    while !active.is_empty() {
        let steps: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let logits =
            model.extend_many(&mut caches, &steps)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let mut going = Vec::with_capacity(active.len());
        for (&i, row) in active.iter().zip(&logits) {
            let next = match sampling {
                Sampling::Greedy => argmax(row),
                Sampling::Sample { temperature, top_p, seed } => {
                    let mut rng = crate::rng::stream(seed, "generate", out[i].len() as u64);
                    sample(row, temperature, top_p, &mut rng)
                }
            };
            out[i].push(next);
            going.push(out[i].len() < requests[i].1 && !stop.contains(&next));
        }
        let mut keep = going.iter().copied();
        caches.retain(|_| keep.next() == Some(true));
        let mut keep = going.iter().copied();
        active.retain(|_| keep.next() == Some(true));
        inputs = active.iter().map(|&i| vec![*out[i].last().expect("a token was chosen")]).collect();
    }
    Ok(out)
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0 as u32
}

/// A draw from `softmax(row / temperature)` restricted to its nucleus `top_p`, in f64 with pipe's
/// portable exponential, so that the same seed picks the same token everywhere.
fn sample(row: &[f32], temperature: f64, top_p: f64, rng: &mut crate::rng::Rng) -> u32 {
    use rand::Rng as _;
    if temperature <= 0.0 {
        return argmax(row);
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut weights: Vec<(u32, f64)> =
        row.iter().enumerate().map(|(i, &v)| (i as u32, libm::exp((v as f64 - max) / temperature))).collect();
    // Most probable first; ties by id, so that the order is total.
    weights.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = weights.iter().map(|w| w.1).sum();
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, w) in &weights {
        mass += w / total;
        kept += 1;
        if mass >= top_p {
            break;
        }
    }
    let weights = &weights[..kept];
    let kept_total: f64 = weights.iter().map(|w| w.1).sum();
    let mut draw = rng.random::<f64>() * kept_total;
    for &(id, w) in weights {
        if draw < w {
            return id;
        }
        draw -= w;
    }
    weights.last().map_or(0, |w| w.0)
}

/// Exact match of greedy generations: for each row with a prompt and a whole completion
/// (`loss_from[r] > 0`, ending with an id of `stop`; a completion cut at `max_length` is not
/// scored), whether greedy decoding after `row[..from]` gives exactly `row[from..]` (the
/// completion and its end-of-sequence token), token for token. Returns the fraction matched, the
/// number of rows scored, and each row's generation (empty for a row not scored). Rows run
/// `batch_size` at a time (see [`generate_many`]); each one's result is its own.
pub fn exact_match(
    model: &CausalLm,
    rows: &[Vec<u32>],
    loss_from: &[u32],
    stop: &[u32],
    batch_size: usize,
) -> Result<(f64, usize, Vec<Vec<u32>>)> {
    let scored = |row: &[u32], from: usize| {
        from > 0 && from < row.len() && row.last().is_some_and(|t| stop.contains(t))
    };
    // A row not scored asks for no tokens.
    let requests: Vec<(&[u32], usize)> = rows
        .iter()
        .zip(loss_from)
        .map(|(row, &from)| match scored(row, from as usize) {
            true => (&row[..from as usize], row.len() - from as usize),
            false => (&row[..0], 0),
        })
        .collect();
    let mut generations = Vec::with_capacity(rows.len());
    for batch in requests.chunks(batch_size.max(1)) {
        generations.extend(generate_many(model, batch, stop, Sampling::Greedy)?);
    }
    let (mut rows_scored, mut matched) = (0, 0);
    for ((row, &from), generated) in rows.iter().zip(loss_from).zip(&generations) {
        if scored(row, from as usize) {
            rows_scored += 1;
            matched += usize::from(generated.as_slice() == &row[from as usize..]);
        }
    }
    Ok((matched as f64 / rows_scored.max(1) as f64, rows_scored, generations))
}

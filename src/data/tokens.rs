//! Tokenized splits on disk: ragged token ids and class indices in one safetensors file.
//!
//! Each split `name` is three tensors: `name.ids` (u32, every row's ids concatenated),
//! `name.offsets` (u64, row boundaries, rows + 1 entries) and `name.labels` (u32). safetensors is
//! simple, safe to read, and readable from Python for anyone who wants to inspect a stage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// One tokenized split.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizedSplit {
    /// Token ids per row.
    pub ids: Vec<Vec<u32>>,
    /// Class index per row.
    pub labels: Vec<u32>,
}

/// Errors reading or writing a tokens file.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to(v)).collect()
}

/// Writes `splits` (name, split) to `path`.
pub fn save_tokens(path: &Path, splits: &[(&str, &TokenizedSplit)]) -> Result<(), TokensError> {
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, split) in splits {
        let flat: Vec<u32> = split.ids.iter().flatten().copied().collect();
        let mut offsets = Vec::with_capacity(split.ids.len() + 1);
        offsets.push(0u64);
        for row in &split.ids {
            offsets.push(offsets.last().copied().unwrap_or(0) + row.len() as u64);
        }
        buffers.push((
            format!("{name}.ids"),
            Dtype::U32,
            vec![flat.len()],
            le_bytes(&flat, u32::to_le_bytes),
        ));
        buffers.push((
            format!("{name}.offsets"),
            Dtype::U64,
            vec![offsets.len()],
            le_bytes(&offsets, u64::to_le_bytes),
        ));
        buffers.push((
            format!("{name}.labels"),
            Dtype::U32,
            vec![split.labels.len()],
            le_bytes(&split.labels, u32::to_le_bytes),
        ));
    }
    let format =
        |e: safetensors::SafeTensorError| TokensError::Format { path: path.into(), message: e.to_string() };
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes).map_err(format)?))
        })
        .collect::<Result<Vec<_>, TokensError>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(format)
}

/// Reads every split of a tokens file.
pub fn load_tokens(path: &Path) -> Result<HashMap<String, TokenizedSplit>, TokensError> {
    let bytes = std::fs::read(path).map_err(|source| TokensError::Io { path: path.into(), source })?;
    let bad = |message: String| TokensError::Format { path: path.into(), message };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let read = |name: &str, dtype: Dtype| -> Result<Vec<u8>, TokensError> {
        let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
        if t.dtype() != dtype {
            return Err(bad(format!("{name}: expected {dtype:?}, found {:?}", t.dtype())));
        }
        Ok(t.data().to_vec())
    };
    let mut splits = HashMap::new();
    for name in st.names() {
        let Some(split) = name.strip_suffix(".labels") else { continue };
        let u32s = |b: Vec<u8>| {
            b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect::<Vec<_>>()
        };
        let ids = u32s(read(&format!("{split}.ids"), Dtype::U32)?);
        let labels = u32s(read(&format!("{split}.labels"), Dtype::U32)?);
        let offsets: Vec<usize> = read(&format!("{split}.offsets"), Dtype::U64)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
            .collect();
        if offsets.len() != labels.len() + 1
            || offsets.windows(2).any(|w| w[0] > w[1])
            || offsets.last() != Some(&ids.len())
        {
            return Err(bad(format!("{split}: offsets do not fit the ids")));
        }
        let rows = offsets.windows(2).map(|w| ids[w[0]..w[1]].to_vec()).collect();
        splits.insert(split.to_string(), TokenizedSplit { ids: rows, labels });
    }
    Ok(splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.safetensors");
        let train =
            TokenizedSplit { ids: vec![vec![101, 5, 102], vec![101, 102], vec![]], labels: vec![1, 0, 1] };
        let val = TokenizedSplit { ids: vec![vec![7]], labels: vec![0] };
        save_tokens(&path, &[("train", &train), ("validation", &val)]).unwrap();
        let back = load_tokens(&path).unwrap();
        assert_eq!(back["train"], train);
        assert_eq!(back["validation"], val);
    }
}

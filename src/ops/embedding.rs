//! Rows of a table by index (the embeddings, the `[CLS]` gather), with a backward that adds each
//! position's gradient into its row in ascending position order.
//!
//! candle's `index_select` backs up through `index_add`, whose CUDA kernel gives each column one
//! thread that walks every index in turn: on a GPU that serialises the embedding gradient
//! (thousands of dependent read-modify-writes per thread, milliseconds per step). Here the
//! positions are grouped by row on the host (the indices are host data already), and the GPU sums
//! each row's group in fixed chunks, then the chunks in order: parallel, and the same bits every
//! run. On the CPU the sum runs position by position, as `index_add` does, so CPU bits are the
//! ones `index_select` gave.

use std::sync::Arc;

#[cfg(feature = "cuda")]
use super::cuda::{self, PushKernelArg as _};
use super::tape;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{slice, with_real};

/// Rows `ids` of `table` `(rows, width)`, as `(ids.len(), width)`.
pub fn embedding(table: &Tensor, ids: Arc<Vec<u32>>) -> Result<Tensor> {
    let (rows, _) = table.dims2()?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
        candle_core::bail!("embedding: index {bad} is out of range for {rows} rows");
    }
    tape::apply1(table, Gather { ids })
}

#[derive(Clone)]
struct Gather {
    ids: Arc<Vec<u32>>,
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(&self, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, width) = tl.shape().dims2()?;
        with_real!("embedding", ts, T => {
            let table = slice::<T>("embedding", ts, tl)?;
            let mut out = Vec::with_capacity(self.ids.len() * width);
            for &id in self.ids.iter() {
                out.extend_from_slice(&table[id as usize * width..(id as usize + 1) * width]);
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((self.ids.len(), width))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, ts: &CudaStorage, tl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (_, width) = tl.shape().dims2()?;
        let dev = cuda::device(ts);
        cuda::with_float!("embedding", ts, T => {
            let table = cuda::input::<T>("embedding", ts, tl)?;
            let ids = cuda::upload(dev, &self.ids)?;
            let n = self.ids.len() * width;
            let mut out = cuda::alloc::<T>(dev, n)?;
            let kernel = cuda::Kernel::typed::<T>(dev, "gather_rows")?;
            let mut args = kernel.args();
            args.arg(&table).arg(&ids).arg(&mut out).arg(&n).arg(&width);
            cuda::launch(args, cuda::elementwise(n))?;
            Ok((cuda::storage(dev, out), Shape::from((self.ids.len(), width))))
        })
    }

    fn bwd(&self, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let scatter = Scatter { ids: Arc::clone(&self.ids), rows: table.dim(0)? };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&scatter)?))
    }
}

/// The gradient of [`Gather`]: `(ids.len(), width)` into `(rows, width)`, zero where no index
/// points.
struct Scatter {
    ids: Arc<Vec<u32>>,
    rows: usize,
}

/// Positions per chunk on the GPU: a row's positions are summed in chunks of this many, then the
/// chunks in order (a padding id can take every position of a batch).
#[cfg(feature = "cuda")]
const CHUNK: usize = 64;

#[cfg(feature = "cuda")]
impl Scatter {
    /// The positions grouped by row in ascending order, cut into chunks: `(order, chunk_starts,
    /// row_chunks, row_ids)`, where chunk `c` covers `order[chunk_starts[c]..chunk_starts[c + 1]]`
    /// and touched row `r` (table row `row_ids[r]`) owns chunks `row_chunks[r]..row_chunks[r + 1]`.
    fn groups(&self) -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>) {
        let mut order: Vec<u32> = (0..self.ids.len() as u32).collect();
        order.sort_by_key(|&p| (self.ids[p as usize], p));
        let (mut chunk_starts, mut row_chunks, mut row_ids) = (Vec::new(), Vec::new(), Vec::new());
        let mut k = 0;
        while k < order.len() {
            let id = self.ids[order[k] as usize];
            row_ids.push(id);
            row_chunks.push(chunk_starts.len() as u32);
            let end = k + order[k..].iter().take_while(|&&p| self.ids[p as usize] == id).count();
            chunk_starts.extend((k..end).step_by(CHUNK).map(|s| s as u32));
            k = end;
        }
        chunk_starts.push(order.len() as u32);
        row_chunks.push((chunk_starts.len() - 1) as u32);
        (order, chunk_starts, row_chunks, row_ids)
    }
}

impl CustomOp1 for Scatter {
    fn name(&self) -> &'static str {
        "embedding-backward"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, width) = gl.shape().dims2()?;
        with_real!("embedding-backward", gs, T => {
            let g = slice::<T>("embedding-backward", gs, gl)?;
            let mut out = vec![T::zero(); self.rows * width];
            for (row, &id) in g.chunks(width).zip(self.ids.iter()) {
                for (o, &v) in out[id as usize * width..(id as usize + 1) * width].iter_mut().zip(row) {
                    *o += v;
                }
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((self.rows, width))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (_, width) = gl.shape().dims2()?;
        let dev = cuda::device(gs);
        let (order, chunk_starts, row_chunks, row_ids) = self.groups();
        let chunks = chunk_starts.len() - 1;
        cuda::with_float!("embedding-backward", gs, T => {
            let g = cuda::input::<T>("embedding-backward", gs, gl)?;
            let (order, chunk_starts) = (cuda::upload(dev, &order)?, cuda::upload(dev, &chunk_starts)?);
            let mut partials = cuda::alloc::<f32>(dev, chunks * width)?;
            {
                let kernel = cuda::Kernel::typed::<T>(dev, "scatter_partials")?;
                let mut args = kernel.args();
                let n = chunks * width;
                args.arg(&g).arg(&order).arg(&chunk_starts).arg(&mut partials).arg(&n).arg(&width);
                cuda::launch(args, cuda::elementwise(n))?;
            }
            let mut out = dev.alloc_zeros::<T>(self.rows * width)?;
            let (row_chunks, row_ids) = (cuda::upload(dev, &row_chunks)?, cuda::upload(dev, &row_ids)?);
            let kernel = cuda::Kernel::typed::<T>(dev, "scatter_finish")?;
            let mut args = kernel.args();
            let n = (row_chunks.len() - 1) * width;
            args.arg(&partials).arg(&row_chunks).arg(&row_ids).arg(&mut out).arg(&n).arg(&width);
            cuda::launch(args, cuda::elementwise(n))?;
            Ok((cuda::storage(dev, out), Shape::from((self.rows, width))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[allow(clippy::disallowed_methods)] // candle as the reference
    #[test]
    fn matches_index_select_and_its_gradient_bit_for_bit() -> Result<()> {
        let table = input(&[5, 3], 1).to_dtype(candle_core::DType::F32)?;
        let ids = vec![4u32, 0, 4, 2, 4, 0];
        let idx = Tensor::new(ids.as_slice(), table.device())?;
        let var = candle_core::Var::from_tensor(&table)?;
        let w = input(&[6, 3], 2).to_dtype(candle_core::DType::F32)?;
        let ours = embedding(var.as_tensor(), Arc::new(ids))?;
        let theirs = var.as_tensor().index_select(&idx, 0)?;
        assert_eq!(ours.to_vec2::<f32>()?, theirs.to_vec2::<f32>()?);
        let g_ours = (ours * &w)?.sum_all()?.backward()?.get(var.as_tensor()).unwrap().to_vec2::<f32>()?;
        let g_theirs =
            (theirs * &w)?.sum_all()?.backward()?.get(var.as_tensor()).unwrap().to_vec2::<f32>()?;
        assert_eq!(g_ours, g_theirs);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_and_bad_indices_are_refused() {
        let table = input(&[4, 3], 3);
        check_grad(&table, |t| embedding(t, Arc::new(vec![1, 3, 1, 0, 1])).unwrap());
        assert!(embedding(&table, Arc::new(vec![4])).is_err());
    }
}

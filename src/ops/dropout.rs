//! Inverted dropout as one op whose mask is recomputed, not stored.
//!
//! Each element's keep/drop decision is a hash of a per-call key and the element's index (a
//! counter-based generator), so the forward can fill the mask in parallel chunks, the backward
//! can recompute exactly the same mask instead of keeping it in memory, and the result is the same
//! whatever the thread count. The key comes from the training step's seeded stream.

#[cfg(feature = "cuda")]
use super::cuda::{self, PushKernelArg as _};
use super::tape;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{Real, slice, vectorized, with_real};

const CHUNK: usize = 1 << 14;

/// Zeroes each element with probability `p` (to 1/65536 resolution) and scales the rest by
/// `1 / (1 - p)`; `key` selects the mask.
pub fn dropout(x: &Tensor, p: f64, key: u64) -> Result<Tensor> {
    if p >= 1.0 {
        return x.zeros_like();
    }
    match DropMask::new(p, key) {
        Some(mask) => tape::apply1(x, Dropout(mask)),
        None => Ok(x.clone()),
    }
}

/// A dropout mask: which elements of a counter space `0, 1, 2, ...` are dropped, and the scale of
/// the kept ones.
#[derive(Debug, Clone, Copy)]
pub(super) struct DropMask {
    /// An element is dropped when its 16-bit draw is below this.
    pub(super) threshold: u32,
    pub(super) scale: f64,
    pub(super) key: u64,
}

impl DropMask {
    /// The mask for probability `p` under `key`; `None` when nothing would be dropped.
    pub fn new(p: f64, key: u64) -> Option<Self> {
        let threshold = (p.clamp(0.0, 1.0) * 65536.0).round() as u32;
        (threshold > 0).then(|| Self { threshold, scale: 1.0 / (1.0 - f64::from(threshold) / 65536.0), key })
    }

    /// The 64-bit hash behind the draws of elements `4 * group .. 4 * group + 4`: each element's
    /// 16-bit draw is its own quarter of it, so the hash runs once per four elements.
    #[inline(always)]
    fn hash(&self, group: u64) -> u64 {
        splitmix64(self.key ^ group.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Zero (dropped) or the scale, for the 16-bit draw `draw`.
    #[inline(always)]
    fn factor_of<T: Real>(&self, draw: u64, scale: T) -> T {
        if ((draw & 0xffff) as u32) < self.threshold { T::zero() } else { scale }
    }

    /// The factors (zero or the scale) of elements `start..start + out.len()` of the counter space.
    pub fn factors<T: Real>(&self, start: u64, out: &mut [T]) {
        let scale = T::from_f64(self.scale);
        let one = |index: u64| self.factor_of(self.hash(index >> 2) >> ((index & 3) * 16), scale);
        // Single elements up to a multiple of four, then blocks of up to `BLOCK` elements in two
        // passes the compiler vectorises: the block's hashes (64-bit multiplies, shifts and xors
        // lane by lane), then each element's draw, the hashes read as 16-bit lanes in element
        // order. The same draws as one element at a time. (A draw taken as `bits[j / 4] >> ..`
        // per element compiled to gathers, or to scatters across blocks: most of the mask's time.)
        let head = (start.next_multiple_of(4) - start).min(out.len() as u64) as usize;
        let (head_out, body) = out.split_at_mut(head);
        for (i, f) in head_out.iter_mut().enumerate() {
            *f = one(start + i as u64);
        }
        let first_group = (start + head as u64) / 4;
        vectorized!({
            let mut hashes = [0u64; BLOCK / 4];
            for (b, block) in body.chunks_mut(BLOCK).enumerate() {
                let group = first_group + (b * BLOCK / 4) as u64;
                for (g, h) in hashes[..block.len().div_ceil(4)].iter_mut().enumerate() {
                    // Little-endian in memory on any CPU, so that 16-bit lane `j` is element `j`'s.
                    *h = self.hash(group + g as u64).to_le();
                }
                // SAFETY: the `BLOCK / 4` hashes are `BLOCK` initialised 16-bit lanes (u16's
                // alignment divides u64's).
                let lanes = unsafe { std::slice::from_raw_parts(hashes.as_ptr().cast::<u16>(), BLOCK) };
                for (f, &lane) in block.iter_mut().zip(lanes) {
                    *f = self.factor_of(u64::from(u16::from_le(lane)), scale);
                }
            }
        });
    }

    /// `x[i] *= factor(start + i)`, with the factors made a chunk of blocks at a time.
    pub fn apply_in_place<T: Real>(&self, start: u64, x: &mut [T]) {
        let mut factors = [T::zero(); 8 * BLOCK];
        let chunk = factors.len();
        for (c, x) in x.chunks_mut(chunk).enumerate() {
            let factors = &mut factors[..x.len()];
            self.factors(start + (c * chunk) as u64, factors);
            vectorized!({ x.iter_mut().zip(&*factors).for_each(|(x, &f)| *x *= f) });
        }
    }
}

/// Elements whose factors are made together (at most): 64 hashes of four draws.
const BLOCK: usize = 256;

#[derive(Clone, Copy)]
struct Dropout(DropMask);

impl Dropout {
    fn run(&self, xs: &CpuStorage, xl: &Layout) -> Result<CpuStorage> {
        with_real!("dropout", xs, T => {
            let x = slice::<T>("dropout", xs, xl)?;
            let mut out = x.to_vec();
            out.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, o)| self.0.apply_in_place((c * CHUNK) as u64, o));
            Ok(T::to_cpu_storage_owned(out))
        })
    }
}

#[cfg(feature = "cuda")]
impl Dropout {
    /// The same mask on the GPU: `kernels.cu` computes the same hash of the same counter.
    fn run_cuda(&self, xs: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
        let dev = cuda::device(xs);
        let DropMask { threshold, scale, key } = self.0;
        cuda::with_float!("dropout", xs, T => {
            let x = cuda::input::<T>("dropout", xs, xl)?;
            let n = x.len();
            let mut y = cuda::alloc::<T>(dev, n)?;
            let kernel = cuda::Kernel::typed::<T>(dev, "dropout")?;
            let mut args = kernel.args();
            let scale = scale as f32;
            args.arg(&x).arg(&mut y).arg(&n).arg(&key).arg(&threshold).arg(&scale);
            cuda::launch(args, cuda::elementwise(n))?;
            Ok(cuda::storage(dev, y))
        })
    }
}

/// A well-mixed 64-bit hash (the SplitMix64 finaliser).
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.run(xs, xl)?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((self.run_cuda(xs, xl)?, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The same mask and scale applied to the gradient.
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(grad, &DropoutBackward(*self))?))
    }
}

/// Applies the forward's mask to a gradient (the second operand is unused).
struct DropoutBackward(Dropout);

impl CustomOp2 for DropoutBackward {
    fn name(&self) -> &'static str {
        "dropout-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((self.0.run(gs, gl)?, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Ok((self.0.run_cuda(gs, gl)?, gl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[test]
    fn drops_about_p_and_keeps_the_expectation() -> Result<()> {
        let x = Tensor::ones(200_000, candle_core::DType::F64, &candle_core::Device::Cpu)?;
        let y = dropout(&x, 0.1, 7)?.to_vec1::<f64>()?;
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        let mean = y.iter().sum::<f64>() / y.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        assert_eq!(y, dropout(&x, 0.1, 7)?.to_vec1::<f64>()?, "same key, same mask");
        assert_ne!(y, dropout(&x, 0.1, 8)?.to_vec1::<f64>()?, "another key, another mask");
        Ok(())
    }

    #[test]
    fn gradient_uses_the_same_mask() {
        check_grad(&input(&[40, 9], 4), |x| dropout(x, 0.3, 11).unwrap());
    }

    #[test]
    fn blocks_of_factors_are_the_element_by_element_mask() {
        // The definition: element `i`'s draw is quarter `i % 4` of the hash of `i / 4`.
        let mask = DropMask::new(0.4, 0x5eed).unwrap();
        let factor = |i: u64| {
            let draw = (splitmix64(mask.key ^ (i >> 2).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                >> ((i & 3) * 16))
                & 0xffff;
            if (draw as u32) < mask.threshold { 0.0 } else { mask.scale as f32 }
        };
        for start in 0..9u64 {
            for n in [0, 1, 3, 5, 31, 32, 33, 64, 100, 255, 256, 257, 300, 1000, 2100] {
                let want: Vec<f32> = (start..start + n as u64).map(factor).collect();
                let mut got = vec![f32::NAN; n];
                mask.factors(start, &mut got);
                assert_eq!(got, want, "start {start}, {n} elements");
                let mut x = vec![1.0f32; n];
                mask.apply_in_place(start, &mut x);
                assert_eq!(x, want, "in place: start {start}, {n} elements");
            }
        }
    }
}

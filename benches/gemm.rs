//! pipe's GEMM against candle's matmul (the `gemm` crate) on the products of a MiniLM training step.
//!
//! `cargo bench --bench gemm [-- ROWS [INxOUT ...] [--bf16]]` (default 2048 = batch 32 x len 64,
//! dense, and MiniLM's layers 384x384 384x1536 1536x384; SmolLM2's are 576x960 576x576 576x3072
//! 1536x576). `--bf16`: pipe's products with bf16 operands (`dtype = "bf16"` on the CPU), against
//! candle's f32 matmul.
//! For each product of a layer (forward `x W^T`, input gradient `g W`, weight gradient `g^T x`),
//! the median of 15 runs of each, interleaved, in GFLOP/s. pipe's kernel path is the CPU's best
//! unless `PIPE_KERNEL` forces one.

#![allow(clippy::disallowed_methods)] // candle's matmul is the comparison

use std::time::Instant;

use candle_core::{Device, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { pipe::runtime::configure() }.map_err(candle_core::Error::wrap)?;
    let rows: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(2048);
    let mut layers: Vec<(usize, usize)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (inp, out) = a.split_once('x')?;
            Some((inp.parse().ok()?, out.parse().ok()?))
        })
        .collect();
    let products = match std::env::args().any(|a| a == "--bf16") {
        true => pipe::ops::Products::Bf16,
        false => pipe::ops::Products::Full,
    };
    if layers.is_empty() {
        layers = vec![(384, 384), (384, 1536), (1536, 384)];
    }
    println!(
        "kernel path {}, {} threads, {rows} rows, pipe's products {products:?}",
        pipe::ops::cpu::kernel_path(),
        rayon::current_num_threads()
    );
    let dev = Device::Cpu;
    let fill = |n: usize, salt: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + salt) % 1000) as f32 / 1000.0 - 0.5).collect()
    };
    let (mut pipe_total, mut candle_total) = (0.0, 0.0);
    for &(inp, out) in &layers {
        let x = fill(rows * inp, 1);
        let w = fill(out * inp, 2);
        let g = fill(rows * out, 3);
        let (tx, tw, tg) = (
            Tensor::from_slice(&x, (rows, inp), &dev)?,
            Tensor::from_slice(&w, (out, inp), &dev)?,
            Tensor::from_slice(&g, (rows, out), &dev)?,
        );
        type Product<'a> = (&'a str, Box<dyn Fn() + 'a>, Box<dyn Fn() + 'a>);
        let products: [Product; 3] = [
            (
                "x W^T",
                Box::new(|| {
                    drop(pipe::ops::gemm::matmul_with(
                        &x,
                        &w,
                        rows,
                        inp,
                        out,
                        pipe::ops::gemm::Transpose::Rhs,
                        products,
                    ))
                }),
                Box::new(|| drop(tx.matmul(&tw.t().unwrap()).unwrap())),
            ),
            (
                "g W",
                Box::new(|| {
                    drop(pipe::ops::gemm::matmul_with(
                        &g,
                        &w,
                        rows,
                        out,
                        inp,
                        pipe::ops::gemm::Transpose::None,
                        products,
                    ))
                }),
                Box::new(|| drop(tg.matmul(&tw).unwrap())),
            ),
            (
                "g^T x",
                Box::new(|| {
                    drop(pipe::ops::gemm::matmul_with(
                        &g,
                        &x,
                        out,
                        rows,
                        inp,
                        pipe::ops::gemm::Transpose::Lhs,
                        products,
                    ))
                }),
                Box::new(|| drop(tg.t().unwrap().matmul(&tx).unwrap())),
            ),
        ];
        let (m_k_n, flops) = ((rows, inp, out), 2.0 * (rows * inp * out) as f64);
        for (name, pipe_run, candle_run) in &products {
            let (mut tp, mut tc) = (Vec::new(), Vec::new());
            for _ in 0..15 {
                let t = Instant::now();
                pipe_run();
                tp.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                candle_run();
                tc.push(t.elapsed().as_secs_f64());
            }
            let (p, c) = (median(tp), median(tc));
            pipe_total += p;
            candle_total += c;
            println!(
                "{name:6} rows {rows} in {} out {}: pipe {:6.1} GFLOP/s  candle {:6.1} GFLOP/s  ratio {:.2}",
                m_k_n.1,
                m_k_n.2,
                flops / p * 1e-9,
                flops / c * 1e-9,
                c / p
            );
        }
    }
    println!(
        "all {} products: pipe {:.1} ms, candle {:.1} ms, candle/pipe {:.3}",
        3 * layers.len(),
        pipe_total * 1e3,
        candle_total * 1e3,
        candle_total / pipe_total
    );
    Ok(())
}

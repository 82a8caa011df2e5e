//! A training step's own reverse pass over pipe's ops.
//!
//! candle's `backward` gives every tensor on the way a zero-filled gradient and adds each
//! contribution into a new buffer: four passes over memory and two allocations for a tensor with
//! one consumer, where the contribution itself would do. In a dense MiniLM step (4,096 tokens)
//! that cost about 80 ms of 960 in f32 and 70 of 700 in bf16. While a [`Recording`] is live on a
//! thread, each op of [`super`] (and [`add`], [`cat`] and [`stack`], for the tensor ops the models
//! use between them) notes its
//! inputs, its output and how to run its backward; [`Recording::gradients`] then walks the notes in
//! reverse, running each op's own backward (the one candle would run) and keeping a tensor's first
//! gradient as it comes. A second contribution is added as candle adds it, so each gradient is the
//! sum candle computes, up to the sign of an exact zero (candle's zero-filled start turns a -0 into
//! +0). Nothing downstream reads that sign: products and sums start from +0, and AdamW's moments
//! and update for a zero gradient are +0 and zero either way. The trained bits are the same (the
//! golden digests hold them, and the checked-in quick-start record's).
//!
//! A forward that passed a tensor through an op that does not record (a reshape, a narrow, a
//! dtype cast on a GPU...) leaves gaps in the notes; `gradients` finds them before any work and
//! runs candle's `backward` instead (the same bits, more time).
//!
//! While a [`Profile`] is live on the thread, the same choke points time every op, forward and
//! backward, by name: where a step's time goes, as the step runs it (`train_step --profile`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Tensor, TensorId};

/// An op's backward: the gradients of its inputs (in order, `None` where it has none) from its
/// inputs, its output and the output's gradient.
type Backward = Box<dyn Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>>>;

/// One recorded op.
struct Node {
    /// The op's name, for a [`Profile`].
    name: &'static str,
    /// The inputs as the caller passed them: where their gradients go.
    sources: Vec<Tensor>,
    /// The inputs as the op read them (made contiguous): what its backward reads.
    args: Vec<Tensor>,
    output: Tensor,
    backward: Backward,
}

/// The live recording's notes, with the number of the [`Recording`] that owns them.
struct Tape {
    owner: u64,
    nodes: Vec<Node>,
}

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
    static RECORDINGS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static PROFILE: RefCell<Option<Vec<OpTime>>> = const { RefCell::new(None) };
}

/// One line of a [`Profile`]: a pass, an op's name, the time spent.
pub type OpTime = (Pass, &'static str, Duration);

/// A pass of a training step, in a [`Profile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

/// The wall time of pipe's recorded ops on this thread, per pass and op name, from [`Self::start`]
/// until it is dropped: forward ops where they run (their inputs' `contiguous` copies included),
/// backward ones as [`Recording::gradients`] runs them, and the sums of gradients of tensors with
/// several consumers as `backward "sum"`. Times are the calling thread's view: on a GPU, where
/// kernels run asynchronously, they are launch times unless the ops synchronise. For benchmarks.
pub struct Profile {
    /// Tied to the thread whose ops it times.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Profile {
    /// Starts timing this thread's ops (a profile already live starts over).
    pub fn start() -> Self {
        PROFILE.with(|p| *p.borrow_mut() = Some(Vec::new()));
        Self { _thread: std::marker::PhantomData }
    }

    /// The totals so far, `(pass, op, time)`, longest first; the totals start over from zero.
    pub fn take(&self) -> Vec<OpTime> {
        let mut totals = PROFILE.with(|p| p.borrow_mut().as_mut().map(std::mem::take)).unwrap_or_default();
        totals.sort_by_key(|&(_, _, spent)| std::cmp::Reverse(spent));
        totals
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        PROFILE.with(|p| *p.borrow_mut() = None);
    }
}

/// Runs `f`, adding its wall time to `(pass, name)` if a [`Profile`] is live on this thread.
fn timed<R>(pass: Pass, name: &'static str, f: impl FnOnce() -> R) -> R {
    let on = PROFILE.with(|p| p.borrow().is_some());
    if !on {
        return f();
    }
    let start = Instant::now();
    let result = f();
    let spent = start.elapsed();
    PROFILE.with(|p| {
        if let Some(totals) = p.borrow_mut().as_mut() {
            match totals.iter_mut().find(|(p, n, _)| *p == pass && *n == name) {
                Some(entry) => entry.2 += spent,
                None => totals.push((pass, name, spent)),
            }
        }
    });
    result
}

/// Records the ops run on this thread until [`Recording::gradients`] or the end of its scope (a
/// recording started while another is live replaces it).
pub struct Recording {
    id: u64,
    /// Tied to the thread whose ops it records.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Recording {
    /// Starts recording this thread's ops (a recording already live is dropped).
    pub fn start() -> Self {
        let id = RECORDINGS.with(|n| {
            n.set(n.get() + 1);
            n.get()
        });
        TAPE.with(|t| *t.borrow_mut() = Some(Tape { owner: id, nodes: Vec::new() }));
        Self { id, _thread: std::marker::PhantomData }
    }

    /// Ends the recording and returns the gradients of `loss` times `scale` (a scalar) with
    /// respect to every variable it depends on: those of candle's `(loss * scale).backward()`,
    /// by pipe's own pass where the recorded ops reach from `loss` back to its variables, else by
    /// candle's.
    pub fn gradients(self, loss: &Tensor, scale: f64) -> Result<GradStore> {
        match self.own_pass(loss, scale)? {
            Some(store) => Ok(store),
            None => loss.affine(scale, 0.0)?.backward(),
        }
    }

    /// [`Self::gradients`] by pipe's own pass; `None` where the notes have a gap (see the module
    /// doc).
    fn own_pass(self, loss: &Tensor, scale: f64) -> Result<Option<GradStore>> {
        let Some(nodes) = self.take() else { return Ok(None) };
        if !complete(&nodes, loss) {
            return Ok(None);
        }
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        grads.insert(loss.id(), loss.ones_like()?.affine(scale, 0.0)?);
        // Each note dropped once run (its backward and the references it holds).
        for node in nodes.into_iter().rev() {
            let Some(grad) = grads.remove(&node.output.id()) else { continue };
            let input_grads = timed(Pass::Backward, node.name, || {
                (node.backward)(&node.args, &node.output, &grad.detach())
            })?;
            for (source, g) in node.sources.iter().zip(input_grads) {
                let Some(g) = g.filter(|_| source.track_op()) else { continue };
                match grads.entry(source.id()) {
                    Entry::Vacant(e) => {
                        e.insert(if source.is_variable() { own_buffer(g)? } else { g.detach() });
                    }
                    // As candle sums (its first term, zero plus a gradient, is that gradient).
                    Entry::Occupied(mut e) => {
                        let sum = timed(Pass::Backward, "sum", || e.get().add(&g))?.detach();
                        e.insert(sum);
                    }
                }
            }
        }
        let mut store = GradStore::default();
        for (id, grad) in grads {
            store.insert_id(id, grad);
        }
        Ok(Some(store))
    }

    /// This recording's notes, if it is still the live one.
    fn take(&self) -> Option<Vec<Node>> {
        TAPE.with(|t| {
            let mut tape = t.borrow_mut();
            match tape.as_ref() {
                Some(live) if live.owner == self.id => tape.take().map(|live| live.nodes),
                _ => None,
            }
        })
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// A variable's gradient in a buffer of its own. It lives as long as the step, and a fused
/// backward returns the weight and bias gradients of a norm as rows of the buffer that holds its
/// input's gradient: kept as they are, they kept every layer's such buffer alive (180 MB more at
/// the peak of a BERT-base step). A view is summed into zeros, as candle would.
fn own_buffer(g: Tensor) -> Result<Tensor> {
    match g.layout().start_offset() == 0 && g.is_contiguous() {
        true => Ok(g.detach()),
        false => Ok(g.zeros_like()?.add(&g)?.detach()),
    }
}

/// Whether every input of every note that needs a gradient is a variable or the output of an
/// earlier note, and `loss` is a note's output: then the notes carry every gradient back.
fn complete(nodes: &[Node], loss: &Tensor) -> bool {
    let mut produced = std::collections::HashSet::new();
    for node in nodes {
        let reached = |x: &Tensor| !x.track_op() || x.is_variable() || produced.contains(&x.id());
        if !node.sources.iter().all(reached) {
            return false;
        }
        produced.insert(node.output.id());
    }
    produced.contains(&loss.id())
}

/// Notes an op, if a recording is live and its output needs a gradient.
fn note(name: &'static str, sources: &[&Tensor], args: Vec<Tensor>, output: &Tensor, backward: Backward) {
    if !output.track_op() {
        return;
    }
    TAPE.with(|t| {
        if let Some(tape) = t.borrow_mut().as_mut() {
            let sources = sources.iter().map(|&s| s.clone()).collect();
            tape.nodes.push(Node { name, sources, args, output: output.clone(), backward });
        }
    });
}

/// `op` on `x` (made contiguous), recorded.
pub(crate) fn apply1<C: CustomOp1 + Clone + Send + Sync + 'static>(x: &Tensor, op: C) -> Result<Tensor> {
    let name = op.name();
    let (arg, y) = timed(Pass::Forward, name, || {
        let arg = x.contiguous()?;
        let y = arg.apply_op1(op.clone())?;
        Ok::<_, candle_core::Error>((arg, y))
    })?;
    note(name, &[x], vec![arg], &y, Box::new(move |a, y, g| Ok(vec![op.bwd(&a[0], y, g)?])));
    Ok(y)
}

/// `op` on `x` and `w` (made contiguous), recorded.
pub(crate) fn apply2<C: CustomOp2 + Clone + Send + Sync + 'static>(
    x: &Tensor,
    w: &Tensor,
    op: C,
) -> Result<Tensor> {
    let name = op.name();
    let (args, y) = timed(Pass::Forward, name, || {
        let args = vec![x.contiguous()?, w.contiguous()?];
        let y = args[0].apply_op2(&args[1], op.clone())?;
        Ok::<_, candle_core::Error>((args, y))
    })?;
    let backward = Box::new(move |a: &[Tensor], y: &Tensor, g: &Tensor| {
        let (gx, gw) = op.bwd(&a[0], &a[1], y, g)?;
        Ok(vec![gx, gw])
    });
    note(name, &[x, w], args, &y, backward);
    Ok(y)
}

/// `op` on `x`, `w` and `b` (made contiguous), recorded.
pub(crate) fn apply3<C: CustomOp3 + Clone + Send + Sync + 'static>(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    op: C,
) -> Result<Tensor> {
    let name = op.name();
    let (args, y) = timed(Pass::Forward, name, || {
        let args = vec![x.contiguous()?, w.contiguous()?, b.contiguous()?];
        let y = args[0].apply_op3(&args[1], &args[2], op.clone())?;
        Ok::<_, candle_core::Error>((args, y))
    })?;
    let backward = Box::new(move |a: &[Tensor], y: &Tensor, g: &Tensor| {
        let (gx, gw, gb) = op.bwd(&a[0], &a[1], &a[2], y, g)?;
        Ok(vec![gx, gw, gb])
    });
    note(name, &[x, w, b], args, &y, backward);
    Ok(y)
}

/// `a + b` (same shapes), recorded: both inputs get the output's gradient.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = timed(Pass::Forward, "add", || a.add(b))?;
    let backward =
        Box::new(|_: &[Tensor], _: &Tensor, g: &Tensor| Ok(vec![Some(g.clone()), Some(g.clone())]));
    note("add", &[a, b], vec![a.clone(), b.clone()], &y, backward);
    Ok(y)
}

/// `parts` joined along `dim`, recorded: each part gets its slice of the output's gradient.
pub fn cat(parts: &[Tensor], dim: usize) -> Result<Tensor> {
    let y = timed(Pass::Forward, "cat", || Tensor::cat(parts, dim))?;
    let sizes: Vec<usize> = parts.iter().map(|p| p.dim(dim)).collect::<Result<_>>()?;
    let backward = Box::new(move |_: &[Tensor], _: &Tensor, g: &Tensor| {
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let part = g.narrow(dim, start, len)?.contiguous()?;
                start += len;
                Ok(Some(part))
            })
            .collect()
    });
    note("cat", &parts.iter().collect::<Vec<_>>(), parts.to_vec(), &y, backward);
    Ok(y)
}

/// `parts` (of one shape) stacked along a new first dimension, recorded: each part gets its row
/// of the output's gradient.
pub fn stack(parts: &[Tensor]) -> Result<Tensor> {
    let y = timed(Pass::Forward, "stack", || Tensor::stack(parts, 0))?;
    let backward = Box::new(|a: &[Tensor], _: &Tensor, g: &Tensor| {
        a.iter().enumerate().map(|(i, part)| Ok(Some(g.narrow(0, i, 1)?.reshape(part.shape())?))).collect()
    });
    note("stack", &parts.iter().collect::<Vec<_>>(), parts.to_vec(), &y, backward);
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{self, Activation, AttentionShape, Products};
    use candle_core::{DType, Var};
    use std::sync::Arc;

    fn var(shape: &[usize], salt: u64) -> Var {
        Var::from_tensor(&ops::testing::input(shape, salt).to_dtype(DType::F32).unwrap()).unwrap()
    }

    /// Bits, with a zero's sign dropped: candle's zero-filled start turns a gradient's -0 into +0
    /// (see the module doc).
    fn bits(t: &Tensor) -> Vec<u32> {
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values.iter().map(|&v| if v == 0.0 { 0 } else { v.to_bits() }).collect()
    }

    /// A small encoder-like step through every recording op: the gradients of every variable,
    /// bit for bit those of candle's backward (up to zeros' signs).
    #[test]
    fn the_recorded_pass_gives_candles_gradients_bit_for_bit() -> Result<()> {
        let (tokens, hidden, heads) = (12, 8, 2);
        let table = var(&[20, hidden], 1);
        let positions = var(&[tokens, hidden], 2);
        let (wq, wk, wv) = (var(&[hidden, hidden], 3), var(&[hidden, hidden], 4), var(&[hidden, hidden], 5));
        let (bq, bk, bv) = (var(&[hidden], 6), var(&[hidden], 7), var(&[hidden], 8));
        let (norm_w, norm_b) = (var(&[hidden], 9), var(&[hidden], 10));
        let (up_w, up_b, down_w, down_b) =
            (var(&[16, hidden], 11), var(&[16], 12), var(&[hidden, 16], 13), var(&[hidden], 14));
        let (out_w, out_b) = (var(&[3, hidden], 15), var(&[3], 16));
        let ids: Arc<Vec<u32>> = Arc::new((0..tokens as u32).map(|i| (i * 7) % 20).collect());
        let segments = Arc::new(vec![(0, 5), (5, 7)]);
        let forward = || -> Result<Tensor> {
            let x = add(&ops::embedding(table.as_tensor(), Arc::clone(&ids))?, positions.as_tensor())?;
            let x = ops::layer_norm(&x, norm_w.as_tensor(), norm_b.as_tensor(), 1e-5)?;
            let w = cat(&[wq.as_tensor().clone(), wk.as_tensor().clone(), wv.as_tensor().clone()], 0)?;
            let b = cat(&[bq.as_tensor().clone(), bk.as_tensor().clone(), bv.as_tensor().clone()], 0)?;
            let qkv = ops::linear(&x, &w, &b, Products::Full)?;
            let context = ops::attention(
                &qkv,
                Arc::clone(&segments),
                AttentionShape::full(heads),
                0.1,
                3,
                Products::Full,
            )?;
            let x =
                ops::residual_layer_norm(&context, &x, norm_w.as_tensor(), norm_b.as_tensor(), 1e-5, 0.1, 4)?;
            let inner = ops::linear(&x, up_w.as_tensor(), up_b.as_tensor(), Products::Full)?;
            let out = ops::activated_linear(
                &inner,
                Activation::Gelu,
                down_w.as_tensor(),
                down_b.as_tensor(),
                Products::Full,
            )?;
            let x = add(&ops::dropout(&out, 0.1, 5)?, &x)?;
            let cls = ops::embedding(&x, Arc::new(vec![0, 5]))?;
            let logits = ops::linear(&cls, out_w.as_tensor(), out_b.as_tensor(), Products::Full)?;
            ops::cross_entropy(&logits, &[2, 0], None)
        };
        let vars = [
            &table, &positions, &wq, &wk, &wv, &bq, &bk, &bv, &norm_w, &norm_b, &up_w, &up_b, &down_w,
            &down_b, &out_w, &out_b,
        ];
        let candle = forward()?.affine(0.5, 0.0)?.backward()?;
        let recording = Recording::start();
        let loss = forward()?;
        let ours = recording.own_pass(&loss, 0.5)?.expect("every op recorded");
        for (i, v) in vars.iter().enumerate() {
            let (want, got) = (candle.get(v.as_tensor()).unwrap(), ours.get(v.as_tensor()).unwrap());
            assert_eq!(bits(want), bits(got), "variable {i}");
        }
        Ok(())
    }

    /// A profile times each op by pass and name while it is live (a gradient with two consumers
    /// as a backward "sum"), starts over when taken, and times nothing once dropped.
    #[test]
    fn a_profile_times_each_op_by_pass_and_name() -> Result<()> {
        let (x, w, b) = (var(&[4, 6], 1), var(&[3, 6], 2), var(&[3], 3));
        let step = || -> Result<()> {
            let recording = Recording::start();
            let y = ops::linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), Products::Full)?;
            let loss = ops::cross_entropy(&add(&y, &y)?, &[0, 1, 2, 0], None)?;
            recording.gradients(&loss, 1.0).map(drop)
        };
        let profile = Profile::start();
        step()?;
        let names: Vec<(Pass, &str)> = profile.take().iter().map(|&(pass, name, _)| (pass, name)).collect();
        for want in [
            (Pass::Forward, "linear"),
            (Pass::Backward, "linear"),
            (Pass::Forward, "add"),
            (Pass::Backward, "sum"),
        ] {
            assert!(names.contains(&want), "{want:?} missing from {names:?}");
        }
        assert!(profile.take().is_empty(), "taking starts the totals over");
        drop(profile);
        step()?;
        PROFILE.with(|p| assert!(p.borrow().is_none()));
        Ok(())
    }

    /// An op that does not record (a reshape here) leaves a gap: no gradients, so that the
    /// caller runs candle's backward instead.
    #[test]
    fn a_gap_in_the_recording_gives_none() -> Result<()> {
        let (x, w, b) = (var(&[4, 6], 1), var(&[3, 6], 2), var(&[3], 3));
        let recording = Recording::start();
        let y = ops::linear(
            &x.as_tensor().reshape((4, 6))?.affine(2.0, 0.0)?,
            w.as_tensor(),
            b.as_tensor(),
            Products::Full,
        )?;
        let loss = ops::cross_entropy(&y, &[0, 1, 2, 0], None)?;
        assert!(recording.own_pass(&loss, 1.0)?.is_none());
        // Nothing is recorded once the recording is over.
        let loss = ops::cross_entropy(
            &ops::linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), Products::Full)?,
            &[0, 1, 2, 0],
            None,
        )?;
        TAPE.with(|t| assert!(t.borrow().is_none()));
        drop(loss);
        Ok(())
    }
}

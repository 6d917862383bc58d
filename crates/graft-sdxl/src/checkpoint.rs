//! Gradient checkpointing: run a forward as segments, keep only each segment's inputs, and in
//! the backward run each segment again with tracking to back-propagate through it.
//!
//! candle has no recompute hook, so the models are written over a [`Runner`]: every resnet,
//! transformer block and resampler of the UNet is one call of [`Runner::run`] with its tensor
//! inputs listed. [`Direct`] runs the segment in place (the ordinary forward). [`Tape`] runs it on
//! detached inputs, returns detached outputs (so the segment's graph is freed at once), and
//! remembers the inputs and the segment; [`Tape::backward`] then replays the segments from last
//! to first. Anything inside a segment that holds trainable `Var`s (adapter parameters, unfrozen
//! base weights) gets the same gradient as without checkpointing, and the random state the hooks
//! draw from (adapter dropout) is rewound before each replay, so the replay draws what the
//! forward drew.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};

use crate::hooks::Hooks;
use crate::rng::RngState;

/// A piece of the forward: tensors in, tensors out.
pub type Segment<'a> = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'a>;

/// Runs the segments of a forward.
pub trait Runner<'a> {
    fn run(&mut self, inputs: &[&Tensor], segment: Segment<'a>) -> Result<Vec<Tensor>>;
}

/// Runs one segment that has one output.
pub fn run1<'a>(runner: &mut dyn Runner<'a>, inputs: &[&Tensor], segment: impl Fn(&[Tensor]) -> Result<Tensor> + 'a) -> Result<Tensor> {
    let mut out = runner.run(inputs, Box::new(move |xs| Ok(vec![segment(xs)?])))?;
    Ok(out.remove(0))
}

/// The ordinary forward: each segment runs in place, the graph is kept whole.
pub struct Direct;

impl<'a> Runner<'a> for Direct {
    fn run(&mut self, inputs: &[&Tensor], segment: Segment<'a>) -> Result<Vec<Tensor>> {
        let inputs: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        segment(&inputs)
    }
}

/// Where a segment input comes from.
enum Source {
    /// Output `1` of segment `0`.
    Produced(usize, usize),
    /// A tensor from outside the tape (a sample, text embeddings, ...).
    Leaf,
}

struct Input {
    /// Detached: the graph behind it is not kept.
    value: Tensor,
    source: Source,
    /// Whether a gradient must flow into it: it depends on something trainable.
    needs_grad: bool,
    /// The tensor as given, for a leaf that tracks (its graph continues outside the tape).
    outer: Option<Tensor>,
}

struct Recorded<'a> {
    inputs: Vec<Input>,
    segment: Segment<'a>,
    /// The hooks' random state when the segment first ran.
    random: Option<RngState>,
    /// Per output: whether it depends on something trainable.
    outputs_need_grad: Vec<bool>,
}

/// The checkpointing runner (see the module documentation).
pub struct Tape<'a> {
    segments: Vec<Recorded<'a>>,
    /// Detached output handed out -> (segment, output index).
    produced: HashMap<TensorId, (usize, usize)>,
    hooks: &'a dyn Hooks,
}

impl<'a> Tape<'a> {
    /// A tape whose replays rewind `hooks`' random state.
    pub fn new(hooks: &'a dyn Hooks) -> Self {
        Self { segments: Vec::new(), produced: HashMap::new(), hooks }
    }

    /// Back-propagates `grads` (upstream gradients of outputs this tape handed out) through every
    /// recorded segment, then into the graphs of tracked leaf inputs. Returns the gradients of the
    /// `wanted` tensors (the trainable `Var`s) it reached. Only those are kept from segment to
    /// segment: candle's backward also returns gradients for untracked operands (frozen inputs
    /// of tracked ops), which, kept for every segment, would grow to the size of the activations
    /// checkpointing saves.
    pub fn backward(self, grads: &[(&Tensor, Tensor)], wanted: &HashSet<TensorId>) -> Result<GradStore> {
        let end_state = self.hooks.random_state();
        let mut pending: HashMap<(usize, usize), Tensor> = HashMap::new();
        for (t, g) in grads {
            let Some(&at) = self.produced.get(&t.id()) else {
                candle_core::bail!("checkpointing: a gradient was given for a tensor the tape did not produce")
            };
            add_into(&mut pending, at, g.clone())?;
        }
        // An empty store: the gradient of an untracked scalar, without that entry.
        let scalar = Tensor::new(0f32, &candle_core::Device::Cpu)?;
        let mut store = scalar.backward()?;
        store.remove(&scalar);
        let mut leaves: HashMap<TensorId, (Tensor, Tensor)> = HashMap::new();
        for (s, rec) in self.segments.iter().enumerate().rev() {
            let upstream: Vec<(usize, Tensor)> =
                (0..rec.outputs_need_grad.len()).filter_map(|o| pending.remove(&(s, o)).map(|g| (o, g))).collect();
            if upstream.is_empty() {
                continue;
            }
            if let Some(state) = &rec.random {
                self.hooks.set_random_state(*state);
            }
            let vars: Vec<Option<Var>> =
                rec.inputs.iter().map(|i| i.needs_grad.then(|| Var::from_tensor(&i.value)).transpose()).collect::<Result<_>>()?;
            let inputs: Vec<Tensor> =
                rec.inputs.iter().zip(&vars).map(|(i, v)| v.as_ref().map_or_else(|| i.value.clone(), |v| v.as_tensor().clone())).collect();
            let outputs = (rec.segment)(&inputs)?;
            let mut surrogate: Option<Tensor> = None;
            for (o, g) in upstream {
                let y = &outputs[o];
                if !y.track_op() {
                    continue;
                }
                // In f32: outputs (and leaves below) may differ in dtype (bf16 activations).
                let term = (y * g)?.sum_all()?.to_dtype(candle_core::DType::F32)?;
                surrogate = Some(match surrogate {
                    Some(s) => (s + term)?,
                    None => term,
                });
            }
            let Some(surrogate) = surrogate else { continue };
            drop(outputs);
            let mut seg_grads = surrogate.backward()?;
            for (input, var) in rec.inputs.iter().zip(&vars) {
                let Some(var) = var else { continue };
                let Some(g) = seg_grads.remove(var.as_tensor()) else { continue };
                match input.source {
                    Source::Produced(ps, po) => add_into(&mut pending, (ps, po), g)?,
                    Source::Leaf => {
                        let outer = input.outer.as_ref().expect("a leaf that needs a gradient tracks");
                        match leaves.get_mut(&outer.id()) {
                            Some((_, acc)) => *acc = (&*acc + g)?,
                            None => {
                                leaves.insert(outer.id(), (outer.clone(), g));
                            }
                        }
                    }
                }
            }
            merge(&mut store, seg_grads, wanted)?;
        }
        // Tracked leaves (text embeddings from a text encoder with adapters): continue into the
        // graph that produced them.
        let mut surrogate: Option<Tensor> = None;
        for (leaf, g) in leaves.into_values() {
            let term = (leaf * g)?.sum_all()?.to_dtype(candle_core::DType::F32)?;
            surrogate = Some(match surrogate {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        if let Some(s) = surrogate {
            merge(&mut store, s.backward()?, wanted)?;
        }
        if let Some(state) = end_state {
            self.hooks.set_random_state(state);
        }
        Ok(store)
    }
}

impl<'a> Runner<'a> for Tape<'a> {
    fn run(&mut self, inputs: &[&Tensor], segment: Segment<'a>) -> Result<Vec<Tensor>> {
        let random = self.hooks.random_state();
        let inputs: Vec<Input> = inputs
            .iter()
            .map(|&t| match self.produced.get(&t.id()) {
                Some(&(s, o)) => {
                    Input { value: t.clone(), source: Source::Produced(s, o), needs_grad: self.segments[s].outputs_need_grad[o], outer: None }
                }
                None => Input { value: t.detach(), source: Source::Leaf, needs_grad: t.track_op(), outer: t.track_op().then(|| t.clone()) },
            })
            .collect();
        let values: Vec<Tensor> = inputs.iter().map(|i| i.value.clone()).collect();
        let any_input_needs = inputs.iter().any(|i| i.needs_grad);
        let outputs = segment(&values)?;
        drop(values);
        let s = self.segments.len();
        let mut detached = Vec::with_capacity(outputs.len());
        let mut outputs_need_grad = Vec::with_capacity(outputs.len());
        for (o, y) in outputs.into_iter().enumerate() {
            // Inputs are detached, so an output tracks only through a trainable `Var` inside.
            outputs_need_grad.push(any_input_needs || y.track_op());
            let d = y.detach();
            self.produced.insert(d.id(), (s, o));
            detached.push(d);
        }
        self.segments.push(Recorded { inputs, segment, random, outputs_need_grad });
        Ok(detached)
    }
}

fn add_into(pending: &mut HashMap<(usize, usize), Tensor>, at: (usize, usize), g: Tensor) -> Result<()> {
    match pending.get_mut(&at) {
        Some(acc) => *acc = (&*acc + g)?,
        None => {
            pending.insert(at, g);
        }
    }
    Ok(())
}

/// Adds the wanted gradients of `from` into `store` (a `Var` used in several segments sums).
fn merge(store: &mut GradStore, from: GradStore, wanted: &HashSet<TensorId>) -> Result<()> {
    for id in from.get_ids().copied().filter(|id| wanted.contains(id)).collect::<Vec<_>>() {
        let g = from.get_id(id).expect("listed").clone();
        match store.get_id(id) {
            Some(acc) => {
                let sum = (acc + g)?;
                store.insert_id(id, sum);
            }
            None => {
                store.insert_id(id, g);
            }
        }
    }
    Ok(())
}

//! The base weight of a hook point: the tensors as loaded plus a stack of overrides.
//!
//! Every change to a base weight after loading goes through here. An owner (a strategy of an
//! adapter set unfreezing or folding, a set of adapters fusing) pushes the weights it wants the
//! layer to compute with, and pops them when it is done; the module computes with the top of the
//! stack, or with the loaded weights when the stack is empty. A pop shows the tensors below again
//! exactly (bit for bit): nothing is ever recomputed by subtraction, and no one writes into a
//! tensor in place. There is no write access besides push and pop, so nothing else can change a
//! base weight (the load-time replacement that frees and re-reads text encoders aside).
//!
//! **Order.** An entry was computed over the one below it (a fuse adds a delta to the weights it
//! found), so a pop of an entry that is not on top is refused, naming the owner above it. An
//! owner that goes away ([`BaseWeight::drop_holder`], from its `Drop`) takes all its entries out
//! wherever they are: a dropped trainer leaves the model as it found it.
//!
//! **As loaded.** [`AsLoaded`] sets every entry present now aside for as long as it lives: the
//! layers compute with their loaded weights, and what is pushed meanwhile goes on top of those.
//! `graft serve` takes one for each generate request, so an image never sees the weights a
//! training run is changing (the run's entries come back when the guard is dropped). It holds no
//! lock: whoever takes it keeps the training steps out meanwhile (serve's compute lock).

use std::convert::Infallible;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::Tensor;

use crate::hooks::LinearWeights;

/// What an override does to the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverrideKind {
    /// A trainable copy of the weights (a `Var` the optimizer updates in place).
    Unfreeze,
    /// A strategy's delta added into the weights for good (progressive fusion).
    Fold,
    /// Adapters added into the weights for speed; unfused later.
    Fuse,
}

impl fmt::Display for OverrideKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverrideKind::Unfreeze => "unfreeze",
            OverrideKind::Fold => "fold",
            OverrideKind::Fuse => "fuse",
        })
    }
}

/// One party that pushes overrides (an adapter set, a set of adapter files), with an id unique
/// in the process.
#[derive(Debug, Clone)]
pub struct Holder {
    id: u64,
    name: Arc<str>,
}

impl Holder {
    /// A new holder; `what` names its type in messages (`adapter set` gives `adapter set #7`).
    pub fn new(what: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        Self { id, name: format!("{what} #{id}").into() }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The owner of an override: this holder, the part of it (a strategy's index and name, or
    /// none for the holder as a whole) and what the override does.
    pub fn owner(&self, part: Option<(usize, &str)>, kind: OverrideKind) -> Owner {
        let label = match part {
            Some((_, name)) => format!("{kind} by strategy `{name}` of {}", self.name),
            None => format!("{kind} by {}", self.name),
        };
        Owner { holder: self.id, part: part.map(|(i, _)| i), kind, label: label.into() }
    }
}

/// Who pushed an override. Two owners are the same when holder, part and kind are.
#[derive(Debug, Clone)]
pub struct Owner {
    holder: u64,
    part: Option<usize>,
    kind: OverrideKind,
    label: Arc<str>,
}

impl Owner {
    pub fn holder(&self) -> u64 {
        self.holder
    }

    pub fn part(&self) -> Option<usize> {
        self.part
    }

    pub fn kind(&self) -> OverrideKind {
        self.kind
    }
}

impl PartialEq for Owner {
    fn eq(&self, other: &Self) -> bool {
        (self.holder, self.part, self.kind) == (other.holder, other.part, other.kind)
    }
}

impl Eq for Owner {}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// A push or pop the stack refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OverrideError {
    #[error("`{layer}`: cannot take off the {owner}: the {above} is on top of it (take that off first)")]
    NotOnTop { layer: String, owner: String, above: String },
    #[error("`{layer}`: the {owner} is not on this layer's stack")]
    NotFound { layer: String, owner: String },
    #[error("`{layer}`: the {owner} is set aside by an as-loaded view; it cannot be taken off before the view ends")]
    SetAside { layer: String, owner: String },
    #[error("`{layer}`: the {owner} pushes a weight of shape {got:?}, the layer's is {want:?}")]
    Shape { layer: String, owner: String, got: Vec<usize>, want: Vec<usize> },
}

#[derive(Debug)]
struct Stack {
    loaded: LinearWeights,
    entries: Vec<(Owner, LinearWeights)>,
    /// Open as-loaded views, innermost last: each hides the entries below its index.
    floors: Vec<usize>,
}

impl Stack {
    fn floor(&self) -> usize {
        self.floors.last().copied().unwrap_or(0)
    }

    fn top(&self) -> &LinearWeights {
        match self.entries.last() {
            Some((_, w)) if self.entries.len() > self.floor() => w,
            _ => &self.loaded,
        }
    }

    /// How many views begin at or below entry `i` (entries with the same count were computed
    /// over one another).
    fn region(&self, i: usize) -> usize {
        self.floors.iter().filter(|&&f| f <= i).count()
    }

    fn remove(&mut self, i: usize) -> LinearWeights {
        for f in &mut self.floors {
            if *f > i {
                *f -= 1;
            }
        }
        self.entries.remove(i).1
    }
}

/// The weights of one linear or conv hook point, shared by the module and everyone who may
/// override them ([`crate::hooks::SharedLinear`]).
#[derive(Debug)]
pub struct BaseWeight {
    layer: String,
    stack: RwLock<Stack>,
}

/// What the layer computes with now: a read lock on the stack, seen as its top.
pub struct Current<'a>(RwLockReadGuard<'a, Stack>);

impl Deref for Current<'_> {
    type Target = LinearWeights;
    fn deref(&self) -> &LinearWeights {
        self.0.top()
    }
}

impl BaseWeight {
    /// The weights of hook point `layer` as loaded, with nothing on top.
    pub fn new(layer: impl Into<String>, loaded: LinearWeights) -> Self {
        Self { layer: layer.into(), stack: RwLock::new(Stack { loaded, entries: Vec::new(), floors: Vec::new() }) }
    }

    /// The hook point's name.
    pub fn layer(&self) -> &str {
        &self.layer
    }

    fn stack(&self) -> RwLockReadGuard<'_, Stack> {
        self.stack.read().unwrap_or_else(|e| e.into_inner())
    }

    fn stack_mut(&self) -> RwLockWriteGuard<'_, Stack> {
        self.stack.write().unwrap_or_else(|e| e.into_inner())
    }

    /// What the layer computes with now, without copying (held as a read lock: drop it before
    /// pushing or popping). Never fails; shaped like `RwLock::read` so callers read like one.
    pub fn read(&self) -> Result<Current<'_>, Infallible> {
        Ok(Current(self.stack()))
    }

    /// What the layer computes with now (tensor handles, no copy of the data).
    pub fn current(&self) -> LinearWeights {
        self.stack().top().clone()
    }

    /// The weights as loaded.
    pub fn loaded(&self) -> LinearWeights {
        self.stack().loaded.clone()
    }

    /// How many overrides are on the stack (set-aside ones included).
    pub fn depth(&self) -> usize {
        self.stack().entries.len()
    }

    /// The owners on the stack, bottom first.
    pub fn owners(&self) -> Vec<Owner> {
        self.stack().entries.iter().map(|(o, _)| o.clone()).collect()
    }

    /// The owner of the entry the layer computes with, if any.
    pub fn top_owner(&self) -> Option<Owner> {
        let s = self.stack();
        (s.entries.len() > s.floor()).then(|| s.entries.last().map(|(o, _)| o.clone())).flatten()
    }

    /// Puts `weights` on top: the layer computes with them until they are popped. The weight must
    /// have the layer's shape.
    pub fn push(&self, owner: Owner, weights: LinearWeights) -> Result<(), OverrideError> {
        let mut s = self.stack_mut();
        let want = s.top().weight.dims().to_vec();
        // A released text encoder has an empty weight: nothing to compare with.
        if weights.weight.dims() != want.as_slice() && s.top().weight.elem_count() > 0 {
            return Err(OverrideError::Shape { layer: self.layer.clone(), owner: owner.to_string(), got: weights.weight.dims().to_vec(), want });
        }
        s.entries.push((owner, weights));
        Ok(())
    }

    /// Takes `owner`'s entry off the top and returns it. Refused when another owner's entry is
    /// above it, or when it is set aside by a view.
    pub fn pop(&self, owner: &Owner) -> Result<LinearWeights, OverrideError> {
        let mut s = self.stack_mut();
        let Some(i) = s.entries.iter().rposition(|(o, _)| o == owner) else {
            return Err(OverrideError::NotFound { layer: self.layer.clone(), owner: owner.to_string() });
        };
        self.check_on_top(&s, i)?;
        Ok(s.remove(i))
    }

    /// Takes off every entry whose owner satisfies `mine`; they must all be on top (above every
    /// other owner's entry and not set aside). Returns how many; refused as a whole otherwise.
    pub fn pop_all(&self, mine: impl Fn(&Owner) -> bool) -> Result<usize, OverrideError> {
        let mut s = self.stack_mut();
        let Some(lowest) = s.entries.iter().position(|(o, _)| mine(o)) else { return Ok(0) };
        if let Some((above, _)) = s.entries[lowest..].iter().find(|(o, _)| !mine(o)) {
            return Err(OverrideError::NotOnTop { layer: self.layer.clone(), owner: s.entries[lowest].0.to_string(), above: above.to_string() });
        }
        self.check_not_aside(&s, lowest)?;
        let n = s.entries.len() - lowest;
        while s.entries.len() > lowest {
            let last = s.entries.len() - 1;
            s.remove(last);
        }
        Ok(n)
    }

    /// Whether [`BaseWeight::pop_all`] with `mine` would succeed (for checking every layer before
    /// changing any).
    pub fn check_pop_all(&self, mine: impl Fn(&Owner) -> bool) -> Result<(), OverrideError> {
        let s = self.stack();
        let Some(lowest) = s.entries.iter().position(|(o, _)| mine(o)) else { return Ok(()) };
        if let Some((above, _)) = s.entries[lowest..].iter().find(|(o, _)| !mine(o)) {
            return Err(OverrideError::NotOnTop { layer: self.layer.clone(), owner: s.entries[lowest].0.to_string(), above: above.to_string() });
        }
        self.check_not_aside(&s, lowest)
    }

    fn check_not_aside(&self, s: &Stack, i: usize) -> Result<(), OverrideError> {
        if i < s.floor() {
            return Err(OverrideError::SetAside { layer: self.layer.clone(), owner: s.entries[i].0.to_string() });
        }
        Ok(())
    }

    fn check_on_top(&self, s: &Stack, i: usize) -> Result<(), OverrideError> {
        self.check_not_aside(s, i)?;
        let owner = &s.entries[i].0;
        if let Some((above, _)) = s.entries[i + 1..].iter().find(|(o, _)| o != owner) {
            return Err(OverrideError::NotOnTop { layer: self.layer.clone(), owner: owner.to_string(), above: above.to_string() });
        }
        Ok(())
    }

    /// Takes out every entry of `holder`, wherever it is (the holder goes away). An entry another
    /// owner's entry was computed over (above it, not set aside from it) is taken out all the
    /// same, with a warning: that other entry keeps what it was computed from. Returns how many.
    pub fn drop_holder(&self, holder: u64) -> usize {
        let mut s = self.stack_mut();
        let mut n = 0;
        while let Some(i) = s.entries.iter().rposition(|(o, _)| o.holder == holder) {
            let region = s.region(i);
            if let Some((above, _)) =
                s.entries.iter().enumerate().skip(i + 1).find(|(j, (o, _))| o.holder != holder && s.region(*j) == region).map(|(_, e)| e)
            {
                tracing::warn!("`{}`: the {} goes away under the {}, which was computed over it", self.layer, s.entries[i].0, above);
            }
            s.remove(i);
            n += 1;
        }
        n
    }

    /// Sets every entry present now aside: the layer computes with its loaded weights until
    /// [`BaseWeight::put_back`].
    fn set_aside(&self) -> usize {
        let mut s = self.stack_mut();
        let hidden = s.entries.len() - s.floor();
        let n = s.entries.len();
        s.floors.push(n);
        hidden
    }

    /// Ends the innermost view: the entries it set aside are the layer's again. Entries pushed
    /// during the view and still there stay on top (with a warning: they were computed over the
    /// loaded weights).
    fn put_back(&self) {
        let mut s = self.stack_mut();
        let Some(floor) = s.floors.pop() else { return };
        if s.entries.len() > floor {
            tracing::warn!(
                "`{}`: the {} was pushed during an as-loaded view and is still on the stack when it ends",
                self.layer,
                s.entries[floor].0
            );
        }
    }

    /// Replaces the loaded weights (the model frees its text encoders and reads them back); the
    /// overrides are left as they are. Returns the bytes the old loaded tensors held.
    pub(crate) fn replace_loaded(&self, weights: LinearWeights) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut s = self.stack_mut();
        let freed = bytes(&s.loaded.weight) + s.loaded.bias.as_ref().map_or(0, bytes);
        s.loaded = weights;
        freed
    }
}

/// Every layer given to it computes with its loaded weights while this lives (see the module
/// docs). Take it while the model is not used by anyone else (under serve's compute lock), and
/// drop what pushed during it (adapters) before it: their entries were computed over the loaded
/// weights.
#[must_use = "the layers are as loaded only while the guard lives"]
pub struct AsLoaded {
    slots: Vec<Arc<BaseWeight>>,
    hidden: usize,
}

impl AsLoaded {
    pub fn new(slots: impl IntoIterator<Item = Arc<BaseWeight>>) -> Self {
        let slots: Vec<Arc<BaseWeight>> = slots.into_iter().collect();
        let hidden = slots.iter().map(|s| s.set_aside()).sum();
        if hidden > 0 {
            tracing::debug!("{hidden} base weight overrides set aside: the model computes as loaded");
        }
        Self { slots, hidden }
    }

    /// How many overrides it set aside.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

impl Drop for AsLoaded {
    fn drop(&mut self) {
        for s in self.slots.iter().rev() {
            s.put_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn w(v: f32) -> LinearWeights {
        LinearWeights::from(Tensor::full(v, (2, 3), &Device::Cpu).unwrap())
    }

    fn value(b: &BaseWeight) -> f32 {
        b.read().unwrap().weight.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn push_and_pop_in_order_show_the_tensors_below_again() {
        let b = BaseWeight::new("unet.l", w(1.0));
        let (h1, h2) = (Holder::new("set"), Holder::new("files"));
        let (a, f) = (h1.owner(Some((0, "gate")), OverrideKind::Unfreeze), h2.owner(None, OverrideKind::Fuse));
        b.push(a.clone(), w(2.0)).unwrap();
        b.push(f.clone(), w(3.0)).unwrap();
        assert_eq!((value(&b), b.depth()), (3.0, 2));
        assert_eq!(b.top_owner(), Some(f.clone()));
        b.pop(&f).unwrap();
        assert_eq!(value(&b), 2.0);
        b.pop(&a).unwrap();
        assert_eq!((value(&b), b.depth()), (1.0, 0));
        // The very tensor loaded, not a recomputed one.
        assert_eq!(b.current().weight.id(), b.loaded().weight.id());
    }

    #[test]
    fn a_pop_out_of_order_is_refused_naming_the_layer_and_the_owner_above() {
        let b = BaseWeight::new("unet.down.attn2.to_q", w(1.0));
        let (h1, h2) = (Holder::new("adapter set"), Holder::new("adapter files"));
        let a = h1.owner(Some((1, "gate")), OverrideKind::Unfreeze);
        let f = h2.owner(None, OverrideKind::Fuse);
        b.push(a.clone(), w(2.0)).unwrap();
        b.push(f.clone(), w(3.0)).unwrap();
        let e = b.pop(&a).unwrap_err().to_string();
        assert!(e.contains("unet.down.attn2.to_q") && e.contains("strategy `gate`") && e.contains(h2.name()), "{e}");
        assert!(matches!(b.pop_all(|o| o.holder() == h1.id()), Err(OverrideError::NotOnTop { .. })));
        assert!(b.check_pop_all(|o| o.holder() == h1.id()).is_err());
        assert_eq!((value(&b), b.depth()), (3.0, 2), "a refused pop changes nothing");
        let e = b.pop(&h2.owner(None, OverrideKind::Fold)).unwrap_err();
        assert!(matches!(e, OverrideError::NotFound { .. }), "{e}");
        assert!(matches!(
            b.push(a.clone(), LinearWeights::from(Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap())),
            Err(OverrideError::Shape { .. })
        ));
    }

    #[test]
    fn pop_all_takes_a_strategys_entries_off_the_top() {
        let b = BaseWeight::new("l", w(1.0));
        let (h, other) = (Holder::new("set"), Holder::new("set"));
        b.push(other.owner(Some((0, "x")), OverrideKind::Unfreeze), w(5.0)).unwrap();
        b.push(h.owner(Some((2, "pf")), OverrideKind::Unfreeze), w(2.0)).unwrap();
        b.push(h.owner(Some((2, "pf")), OverrideKind::Fold), w(3.0)).unwrap();
        assert_eq!(b.pop_all(|o| o.holder() == h.id() && o.part() == Some(2)).unwrap(), 2);
        assert_eq!((value(&b), b.depth()), (5.0, 1));
    }

    #[test]
    fn dropping_a_holder_takes_all_its_entries_out() {
        let b = BaseWeight::new("l", w(1.0));
        let (h, other) = (Holder::new("set"), Holder::new("files"));
        b.push(h.owner(Some((0, "a")), OverrideKind::Unfreeze), w(2.0)).unwrap();
        b.push(h.owner(Some((1, "b")), OverrideKind::Fold), w(3.0)).unwrap();
        b.push(other.owner(None, OverrideKind::Fuse), w(4.0)).unwrap();
        b.push(h.owner(None, OverrideKind::Fuse), w(5.0)).unwrap();
        assert_eq!(b.drop_holder(h.id()), 3);
        assert_eq!((value(&b), b.depth()), (4.0, 1));
        assert_eq!(b.drop_holder(other.id()), 1);
        assert_eq!(b.current().weight.id(), b.loaded().weight.id());
    }

    #[test]
    fn as_loaded_sets_the_stack_aside_and_puts_it_back() {
        let b = Arc::new(BaseWeight::new("l", w(1.0)));
        let (run, gen) = (Holder::new("training set"), Holder::new("files"));
        let unfrozen = run.owner(Some((0, "gate")), OverrideKind::Unfreeze);
        b.push(unfrozen.clone(), w(2.0)).unwrap();
        {
            let view = AsLoaded::new([b.clone()]);
            assert_eq!(view.hidden(), 1);
            assert_eq!(value(&b), 1.0, "the loaded weights under the view");
            assert_eq!(b.top_owner(), None);
            // The request's own fuse goes on top of the loaded weights, and comes off.
            let fuse = gen.owner(None, OverrideKind::Fuse);
            b.push(fuse.clone(), w(7.0)).unwrap();
            assert_eq!(value(&b), 7.0);
            assert!(matches!(b.pop(&unfrozen), Err(OverrideError::NotOnTop { .. } | OverrideError::SetAside { .. })));
            b.pop(&fuse).unwrap();
            assert_eq!(value(&b), 1.0);
            assert!(matches!(b.pop(&unfrozen), Err(OverrideError::SetAside { .. })));
        }
        assert_eq!((value(&b), b.top_owner()), (2.0, Some(unfrozen.clone())), "the run's weights are back");
        // A holder that goes away during a view: its hidden entry goes, the view's stays on top.
        let view = AsLoaded::new([b.clone()]);
        let fuse = gen.owner(None, OverrideKind::Fuse);
        b.push(fuse.clone(), w(7.0)).unwrap();
        assert_eq!(b.drop_holder(run.id()), 1);
        assert_eq!(value(&b), 7.0);
        b.pop(&fuse).unwrap();
        drop(view);
        assert_eq!((value(&b), b.depth()), (1.0, 0));
    }

    #[test]
    fn replacing_the_loaded_weights_keeps_the_overrides() {
        let b = BaseWeight::new("text_encoder.l", w(1.0));
        let h = Holder::new("set");
        b.push(h.owner(None, OverrideKind::Fuse), w(2.0)).unwrap();
        assert_eq!(b.replace_loaded(w(9.0)), 6 * 4);
        assert_eq!(value(&b), 2.0);
        b.drop_holder(h.id());
        assert_eq!(value(&b), 9.0);
    }
}

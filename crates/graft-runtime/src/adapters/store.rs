//! The host-owned adapter parameters.
//!
//! Every parameter a strategy uses is a candle `Var` keyed by (strategy, layer, name), created
//! here with its init drawn from the project's seeded RNG. Plugins hold no tensors, so a plugin
//! reload keeps the training: the new build's plan is compared with what the store holds
//! ([`ParamStore::apply_plan`]) and matching parameters are reused.
//!
//! The store is shared (`&self` methods behind a mutex) between the hook dispatcher, the
//! optimizer and checkpointing.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use graft_sdxl::rng::GraftRng;

/// Where a parameter lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamKey {
    /// The strategy instance (by default the plugin id).
    pub strategy: String,
    pub layer: String,
    pub name: String,
}

impl ParamKey {
    pub fn new(strategy: &str, layer: &str, name: &str) -> Self {
        Self { strategy: strategy.to_string(), layer: layer.to_string(), name: name.to_string() }
    }
}

impl fmt::Display for ParamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}.{}", self.strategy, self.layer, self.name)
    }
}

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitKind {
    Zeros,
    Normal {
        mean: f64,
        std: f64,
    },
    /// torch's `kaiming_uniform_(a)`: U(±gain·sqrt(3/fan_in)), gain = sqrt(2/(1+a²)),
    /// fan_in = the product of all dimensions but the first.
    KaimingUniform {
        a: f64,
    },
    Constant(f64),
    /// Computed by the strategy from the layer (its `init_param`): the store creates zeros, the
    /// [`AdapterSet`](super::dispatcher::AdapterSet) fills them in.
    FromLayer,
}

impl TryFrom<graft_abi::Init> for InitKind {
    type Error = Error;

    fn try_from(init: graft_abi::Init) -> Result<Self> {
        use graft_abi::InitKind as K;
        Ok(match init.kind {
            K::ZEROS => InitKind::Zeros,
            K::NORMAL => InitKind::Normal { mean: init.a, std: init.b },
            K::KAIMING_UNIFORM => InitKind::KaimingUniform { a: init.a },
            K::CONSTANT => InitKind::Constant(init.a),
            K::FROM_LAYER => InitKind::FromLayer,
            other => return Err(Error::UnknownInit(other.to_string())),
        })
    }
}

impl fmt::Display for InitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitKind::Zeros => write!(f, "zeros"),
            InitKind::Normal { mean, std } => write!(f, "normal(mean={mean}, std={std})"),
            InitKind::KaimingUniform { a } => write!(f, "kaiming_uniform(a={a})"),
            InitKind::Constant(v) => write!(f, "constant({v})"),
            InitKind::FromLayer => write!(f, "from_layer"),
        }
    }
}

/// One stored parameter.
#[derive(Debug, Clone)]
pub struct Param {
    pub var: Var,
    pub trainable: bool,
    /// Optimizer group name (from the plan).
    pub group: String,
    pub init: InitKind,
}

impl Param {
    pub fn dims(&self) -> Vec<usize> {
        self.var.as_tensor().dims().to_vec()
    }

    /// The tensor to compute with: tracked by autograd when trainable, detached when frozen.
    pub fn tensor(&self) -> Tensor {
        if self.trainable {
            self.var.as_tensor().clone()
        } else {
            self.var.as_tensor().detach()
        }
    }
}

/// What [`ParamStore::apply_plan`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanDiff {
    /// New parameters, freshly initialised.
    pub created: Vec<ParamKey>,
    /// Parameters reused with their values (same name and shape).
    pub kept: Vec<ParamKey>,
    /// Same name, other shape: re-initialised with the new shape (old shape, new shape).
    pub reshaped: Vec<(ParamKey, Vec<usize>, Vec<usize>)>,
    /// Held for this strategy but absent from the plan: kept in the store, unused.
    pub unused: Vec<ParamKey>,
}

impl PlanDiff {
    /// True when the plan matched the stored parameters exactly.
    pub fn is_same(&self) -> bool {
        self.created.is_empty() && self.reshaped.is_empty() && self.unused.is_empty()
    }
}

impl fmt::Display for PlanDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} kept, {} created, {} reshaped, {} unused", self.kept.len(), self.created.len(), self.reshaped.len(), self.unused.len())?;
        for k in &self.created {
            write!(f, "\n  created {k}")?;
        }
        for (k, old, new) in &self.reshaped {
            write!(f, "\n  reshaped {k}: {old:?} -> {new:?} (re-initialised)")?;
        }
        for k in &self.unused {
            write!(f, "\n  unused {k} (kept in the store)")?;
        }
        Ok(())
    }
}

/// The host's adapter parameters.
#[derive(Debug)]
pub struct ParamStore {
    device: Device,
    dtype: DType,
    seed: u64,
    params: Mutex<BTreeMap<ParamKey, Param>>,
}

impl ParamStore {
    /// An empty store; `seed` decides every init (each parameter draws from its own stream,
    /// derived from the seed and its key, so the order of creation does not matter).
    pub fn new(device: &Device, dtype: DType, seed: u64) -> Self {
        Self { device: device.clone(), dtype, seed, params: Mutex::new(BTreeMap::new()) }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ParamKey, Param>> {
        // A poisoned lock only means another thread panicked while holding it; the map is
        // still consistent (every update is a single insert).
        self.params.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn get(&self, key: &ParamKey) -> Option<Param> {
        self.lock().get(key).cloned()
    }

    /// The values `init` gives the parameter `key` (deterministic in the store seed and key).
    pub fn init_tensor(&self, key: &ParamKey, shape: &[usize], init: InitKind) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut rng = GraftRng::new(self.seed ^ key_hash(key));
        let values: Vec<f32> = match init {
            InitKind::Zeros | InitKind::FromLayer => vec![0.0; n],
            InitKind::Constant(v) => vec![v as f32; n],
            InitKind::Normal { mean, std } => {
                if std.is_nan() || std < 0.0 {
                    return Err(Error::ParamInit { key: key.clone(), problem: format!("normal init needs std >= 0, got {std}") });
                }
                (0..n).map(|_| (mean + std * rng.normal()) as f32).collect()
            }
            InitKind::KaimingUniform { a } => {
                let fan_in: usize = match shape {
                    [] => 1,
                    [n] => *n,
                    [_, rest @ ..] => rest.iter().product(),
                };
                if fan_in == 0 {
                    return Err(Error::ParamInit {
                        key: key.clone(),
                        problem: format!("kaiming_uniform init needs a non-empty shape, got {shape:?}"),
                    });
                }
                let gain = (2.0 / (1.0 + a * a)).sqrt();
                let bound = gain * (3.0 / fan_in as f64).sqrt();
                (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
            }
        };
        Ok(Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    /// The parameter `key`: created with `shape` and `init` when missing, an error when it
    /// exists with another shape. Returns it and whether it was created.
    pub fn get_or_create(&self, key: &ParamKey, shape: &[usize], init: InitKind, group: &str, trainable: bool) -> Result<(Param, bool)> {
        let mut params = self.lock();
        if let Some(p) = params.get(key) {
            if p.var.as_tensor().dims() != shape {
                return Err(Error::ParamShape { key: Box::new(key.clone()), have: p.var.as_tensor().dims().to_vec(), want: shape.to_vec() });
            }
            return Ok((p.clone(), false));
        }
        let param = Param { var: Var::from_tensor(&self.init_tensor(key, shape, init)?)?, trainable, group: group.to_string(), init };
        params.insert(key.clone(), param.clone());
        Ok((param, true))
    }

    /// Puts a parameter with the given values (from a checkpoint or an imported file),
    /// replacing any existing one.
    pub fn insert(&self, key: ParamKey, value: &Tensor, init: InitKind, group: &str, trainable: bool) -> Result<Param> {
        let value = value.to_device(&self.device)?.to_dtype(self.dtype)?;
        let param = Param { var: Var::from_tensor(&value)?, trainable, group: group.to_string(), init };
        self.lock().insert(key, param.clone());
        Ok(param)
    }

    /// Overwrites the values of an existing parameter (same shape), keeping its `Var`.
    pub fn set(&self, key: &ParamKey, value: &Tensor) -> Result<()> {
        let params = self.lock();
        let Some(p) = params.get(key) else {
            return Err(Error::NoParam(key.clone()));
        };
        if p.var.as_tensor().dims() != value.dims() {
            return Err(Error::ValueShape { key: Box::new(key.clone()), have: p.var.as_tensor().dims().to_vec(), value: value.dims().to_vec() });
        }
        Ok(p.var.set(&value.to_device(&self.device)?.to_dtype(self.dtype)?)?)
    }

    /// Sets trainable / frozen for `name` of (strategy, layer), or all of the layer's
    /// parameters when `name` is `None`. Returns how many changed.
    pub fn set_trainable(&self, strategy: &str, layer: &str, name: Option<&str>, trainable: bool) -> usize {
        let mut params = self.lock();
        let mut n = 0;
        for (k, p) in params.iter_mut() {
            if k.strategy == strategy && k.layer == layer && name.is_none_or(|nm| nm == k.name) && p.trainable != trainable {
                p.trainable = trainable;
                n += 1;
            }
        }
        n
    }

    /// Re-initialises `name` of (strategy, layer) (all when `None`) with its init, in place.
    /// Returns the keys reset.
    pub fn reset(&self, strategy: &str, layer: &str, name: Option<&str>) -> Result<Vec<ParamKey>> {
        let targets: Vec<(ParamKey, Param)> = self
            .lock()
            .iter()
            .filter(|(k, _)| k.strategy == strategy && k.layer == layer && name.is_none_or(|nm| nm == k.name))
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        for (k, p) in &targets {
            p.var.set(&self.init_tensor(k, &p.dims(), p.init)?)?;
        }
        Ok(targets.into_iter().map(|(k, _)| k).collect())
    }

    /// All parameters (of one strategy when given), sorted by key.
    pub fn params(&self, strategy: Option<&str>) -> Vec<(ParamKey, Param)> {
        self.lock().iter().filter(|(k, _)| strategy.is_none_or(|s| s == k.strategy)).map(|(k, p)| (k.clone(), p.clone())).collect()
    }

    /// The trainable parameters (of one strategy when given), sorted by key.
    pub fn trainable(&self, strategy: Option<&str>) -> Vec<(ParamKey, Param)> {
        self.params(strategy).into_iter().filter(|(_, p)| p.trainable).collect()
    }

    /// Creates or reuses the parameters a plan declares for `strategy`: same name and shape
    /// are kept with their values (group and trainable follow the plan), another shape is
    /// re-initialised, missing ones are created. Parameters the plan no longer names stay in
    /// the store and are reported as unused.
    pub fn apply_plan(&self, strategy: &str, plan: &graft_abi::Plan) -> Result<PlanDiff> {
        // Validate the whole plan before changing anything.
        let mut specs = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for att in plan.attachments.iter() {
            for spec in att.params.iter() {
                let key = ParamKey::new(strategy, &att.layer, &spec.name);
                if spec.name.is_empty() {
                    return Err(Error::Plan {
                        strategy: strategy.to_string(),
                        layer: Some(att.layer.to_string()),
                        problem: format!("a parameter of layer `{}` has an empty name", att.layer),
                    });
                }
                if !seen.insert(key.clone()) {
                    return Err(Error::Plan {
                        strategy: strategy.to_string(),
                        layer: Some(att.layer.to_string()),
                        problem: format!("parameter {key} is declared twice"),
                    });
                }
                let init = InitKind::try_from(spec.init).map_err(|e| Error::Plan {
                    strategy: strategy.to_string(),
                    layer: Some(att.layer.to_string()),
                    problem: format!("parameter {key}: {e}"),
                })?;
                let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
                specs.push((key, shape, init, spec.group.to_string(), spec.trainable));
            }
        }

        let mut diff = PlanDiff::default();
        let mut params = self.lock();
        for (key, shape, init, group, trainable) in specs {
            match params.get_mut(&key) {
                Some(p) if p.var.as_tensor().dims() == shape.as_slice() => {
                    p.group = group;
                    p.trainable = trainable;
                    p.init = init;
                    diff.kept.push(key);
                }
                existing => {
                    let old = existing.map(|p| p.dims());
                    let var = Var::from_tensor(&self.init_tensor(&key, &shape, init)?)?;
                    params.insert(key.clone(), Param { var, trainable, group, init });
                    match old {
                        Some(old) => diff.reshaped.push((key, old, shape)),
                        None => diff.created.push(key),
                    }
                }
            }
        }
        diff.unused = params.keys().filter(|k| k.strategy == strategy && !seen.contains(*k)).cloned().collect();
        Ok(diff)
    }
}

/// FNV-1a over the key's parts: a stable per-parameter RNG stream.
fn key_hash(key: &ParamKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [&key.strategy, &key.layer, &key.name] {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::RVec;
    use graft_abi::{Attachment, Init, ParamSpec, Plan};

    fn store() -> ParamStore {
        ParamStore::new(&Device::Cpu, DType::F32, 7)
    }

    fn plan(shape: &[u64]) -> Plan {
        let spec = |name: &str, shape: &[u64], init| ParamSpec {
            name: name.into(),
            shape: shape.iter().copied().collect(),
            init,
            group: "g".into(),
            trainable: true,
        };
        Plan {
            attachments: RVec::from(vec![Attachment {
                layer: "unet.a".into(),
                params: RVec::from(vec![spec("down", shape, Init::kaiming_uniform(5f64.sqrt())), spec("up", &[3, 2], Init::zeros())]),
                attached: true,
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn inits_are_deterministic_and_shaped() -> Result<()> {
        let s = store();
        let key = ParamKey::new("s", "l", "down");
        let a = s.init_tensor(&key, &[4, 16], InitKind::KaimingUniform { a: 5f64.sqrt() })?;
        let b = store().init_tensor(&key, &[4, 16], InitKind::KaimingUniform { a: 5f64.sqrt() })?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        // kaiming_uniform(a = sqrt 5) is U(±1/sqrt(fan_in)) = U(±0.25) here.
        let max = a.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(max <= 0.25 && max > 0.15, "{max}");
        let other = s.init_tensor(&ParamKey::new("s", "l", "up"), &[4, 16], InitKind::KaimingUniform { a: 5f64.sqrt() })?;
        assert_ne!(a.to_vec2::<f32>()?, other.to_vec2::<f32>()?);
        let n = s.init_tensor(&key, &[2000], InitKind::Normal { mean: 1.0, std: 0.5 })?;
        let mean = n.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        let c = s.init_tensor(&key, &[2], InitKind::Constant(0.5))?;
        assert_eq!(c.to_vec1::<f32>()?, vec![0.5, 0.5]);
        Ok(())
    }

    #[test]
    fn get_or_create_checks_shape() -> Result<()> {
        let s = store();
        let key = ParamKey::new("s", "l", "p");
        let (_, created) = s.get_or_create(&key, &[2, 3], InitKind::Zeros, "g", true)?;
        assert!(created);
        let (_, created) = s.get_or_create(&key, &[2, 3], InitKind::Zeros, "g", true)?;
        assert!(!created);
        let e = s.get_or_create(&key, &[3, 2], InitKind::Zeros, "g", true).unwrap_err();
        assert!(matches!(&e, Error::ParamShape { key: k, have, want } if **k == key && have == &[2, 3] && want == &[3, 2]), "{e:?}");
        assert!(e.to_string().contains("exists with shape [2, 3]"), "{e}");
        Ok(())
    }

    /// The store's errors say which kind of problem, with the key or strategy and layer named.
    #[test]
    fn errors_are_typed_and_name_the_key() -> Result<()> {
        let s = store();
        let key = ParamKey::new("s", "l", "p");
        let one = Tensor::ones(2, DType::F32, &Device::Cpu)?;
        assert!(matches!(s.set(&key, &one), Err(Error::NoParam(k)) if k == key));
        s.get_or_create(&key, &[3], InitKind::Zeros, "g", true)?;
        let e = s.set(&key, &one).unwrap_err();
        assert!(matches!(&e, Error::ValueShape { have, value, .. } if have == &[3] && value == &[2]), "{e:?}");
        let e = s.init_tensor(&key, &[2], InitKind::Normal { mean: 0.0, std: -1.0 }).unwrap_err();
        assert!(matches!(&e, Error::ParamInit { key: k, .. } if *k == key), "{e:?}");
        assert_eq!(e.to_string(), "parameter s:l.p: normal init needs std >= 0, got -1");
        let mut twice = plan(&[2, 5]);
        let first = twice.attachments[0].params[0].clone();
        twice.attachments[0].params.push(first);
        let e = s.apply_plan("lora", &twice).unwrap_err();
        assert!(matches!(&e, Error::Plan { strategy, layer: Some(l), .. } if strategy == "lora" && l == "unet.a"), "{e:?}");
        Ok(())
    }

    #[test]
    fn apply_plan_keeps_matching_params() -> Result<()> {
        let s = store();
        let d = s.apply_plan("lora", &plan(&[2, 5]))?;
        assert_eq!(d.created.len(), 2);
        let down = ParamKey::new("lora", "unet.a", "down");
        let up = ParamKey::new("lora", "unet.a", "up");
        s.set(&up, &Tensor::ones((3, 2), DType::F32, &Device::Cpu)?)?;
        let d = s.apply_plan("lora", &plan(&[2, 5]))?;
        assert!(d.is_same(), "{d}");
        assert_eq!(s.get(&up).unwrap().var.as_tensor().sum_all()?.to_scalar::<f32>()?, 6.0);
        let d = s.apply_plan("lora", &plan(&[4, 5]))?;
        assert_eq!(d.reshaped, vec![(down.clone(), vec![2, 5], vec![4, 5])]);
        assert_eq!(d.kept, vec![up.clone()]);
        assert_eq!(s.get(&up).unwrap().var.as_tensor().sum_all()?.to_scalar::<f32>()?, 6.0);
        let d = s.apply_plan("lora", &Plan::default())?;
        assert_eq!(d.unused.len(), 2);
        assert_eq!(s.len(), 2);
        Ok(())
    }

    #[test]
    fn freeze_and_reset() -> Result<()> {
        let s = store();
        s.apply_plan("lora", &plan(&[2, 5]))?;
        assert_eq!(s.set_trainable("lora", "unet.a", Some("up"), false), 1);
        assert_eq!(s.trainable(Some("lora")).len(), 1);
        let up = ParamKey::new("lora", "unet.a", "up");
        s.set(&up, &Tensor::ones((3, 2), DType::F32, &Device::Cpu)?)?;
        s.reset("lora", "unet.a", Some("up"))?;
        assert_eq!(s.get(&up).unwrap().var.as_tensor().sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}

//! The plugin side of the ABI: the root module and the strategy object, each entry point run
//! inside `catch_unwind` so that a panic becomes an error value (a panic unwinding across an
//! `extern "C"` function would abort the host).

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Once, OnceLock};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_CanDowncast;
use abi_stable::sabi_types::RMut;
use abi_stable::std_types::{RNone, ROption, RResult, RSlice, RSome, RStr, RString, RVec};
use graft_abi as abi;
use graft_abi::{ErrorKind, GResult, GraftError, HostOps_TO, LayerInfo, PluginMod, PluginModRef, TensorId};

use crate::error::{Error, Result};
use crate::ops::{Inputs, Ops, OpsState};
use crate::Strategy;

thread_local! {
    /// Where the last panic on this thread happened (set by our panic hook).
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once per plugin library) a panic hook that records the location instead of
/// printing: the host prints the error it gets back.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
            PANIC_LOCATION.with(|slot| *slot.borrow_mut() = location);
        }));
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Runs one entry point: errors become error values, panics become `PANIC` errors.
fn guard<T>(entry: &str, f: impl FnOnce() -> Result<T>) -> GResult<T> {
    install_panic_hook();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into_abi()),
        Err(payload) => {
            let location = PANIC_LOCATION.with(|slot| slot.borrow_mut().take());
            let at = location.map(|l| format!(" at {l}")).unwrap_or_default();
            RResult::RErr(GraftError::new(ErrorKind::PANIC, format!("{entry} panicked{at}: {}", panic_message(payload.as_ref()))))
        }
    }
}

/// Runs `f` with an [`Ops`] over the host's table; the first failed op wins over `f`'s result.
fn with_ops<T>(raw: HostOps_TO<'_, RMut<'_, ()>>, training: bool, step: u64, f: impl FnOnce(Ops<'_>) -> Result<T>) -> Result<T> {
    let state = OpsState::new(raw);
    let result = f(Ops::new(&state, training, step));
    match state.take_error() {
        Some(e) => Err(e),
        None => result,
    }
}

/// The strategy object handed to the host.
struct Guarded<S> {
    inner: S,
}

impl<S: Strategy> abi::Strategy for Guarded<S> {
    fn manifest(&self) -> GResult<abi::Manifest> {
        guard("manifest", || Ok(S::manifest().into_abi()))
    }

    fn plan(&mut self, layers: RSlice<'_, LayerInfo>, config_json: RStr<'_>) -> GResult<abi::Plan> {
        guard("plan", || self.inner.plan(layers.as_slice(), config_json.as_str()).map(|p| p.into_abi()))
    }

    fn forward(&self, ops: HostOps_TO<'_, RMut<'_, ()>>, layer: &LayerInfo, inputs: &abi::ForwardInputs) -> GResult<TensorId> {
        guard("forward", || {
            with_ops(ops, inputs.training, inputs.step, |ops| {
                let inputs = Inputs::from_abi(ops, inputs);
                self.inner.forward(ops, layer, &inputs).map(|t| t.id())
            })
        })
    }

    fn delta_weight(&self, ops: HostOps_TO<'_, RMut<'_, ()>>, layer: &LayerInfo) -> GResult<ROption<TensorId>> {
        guard("delta_weight", || with_ops(ops, false, 0, |ops| Ok(self.inner.delta_weight(ops, layer)?.map(|t| t.id()).into())))
    }

    fn on_step(&mut self, step: u64) -> GResult<RVec<abi::StageDirective>> {
        guard("on_step", || Ok(self.inner.on_step(step)?.into_iter().map(|d| d.into_abi()).collect()))
    }

    fn export(&self, ops: HostOps_TO<'_, RMut<'_, ()>>, layer: &LayerInfo) -> GResult<ROption<abi::ExportForm>> {
        guard("export", || with_ops(ops, false, 0, |ops| Ok(self.inner.export(ops, layer)?.map(|e| e.into_abi()).into())))
    }

    fn save_state(&self) -> GResult<RString> {
        guard("save_state", || self.inner.save_state().map(RString::from))
    }

    fn load_state(&mut self, state_json: RStr<'_>) -> GResult<()> {
        guard("load_state", || self.inner.load_state(state_json.as_str()))
    }
}

extern "C" fn abi_version() -> u32 {
    abi::ABI_VERSION
}

extern "C" fn manifest<S: Strategy>() -> GResult<abi::Manifest> {
    guard("manifest", || Ok(S::manifest().into_abi()))
}

extern "C" fn new_strategy<S: Strategy>(config_json: RStr<'_>) -> GResult<abi::StrategyBox> {
    guard("new_strategy", || {
        let inner = S::new(config_json.as_str()).map_err(|e| match e.kind() {
            ErrorKind::OTHER => Error::new(ErrorKind::CONFIG, e.message()),
            _ => e,
        })?;
        // Downcastable, so the `graft.ops` extension's entry points can reach the strategy.
        Ok(abi::Strategy_TO::from_value(Guarded { inner }, TD_CanDowncast))
    })
}

/// The extensions this SDK builds into a plugin: `graft.ops` and `graft.config_schema`, version 1.
extern "C" fn extension<S: Strategy>(name: RStr<'_>, version: u32) -> ROption<abi::Extension> {
    static OPS: OnceLock<usize> = OnceLock::new();
    static SCHEMA: OnceLock<usize> = OnceLock::new();
    // One plugin library holds one strategy type, so one module per library.
    match (name.as_str(), version) {
        (abi::OPS_EXTENSION, abi::OPS_EXTENSION_VERSION) => {
            let module = *OPS.get_or_init(|| {
                let m: &'static abi::OpsExtensionV1 = Box::leak(Box::new(abi::OpsExtensionV1 { connect, init_param: init_param::<S> }));
                m as *const abi::OpsExtensionV1 as usize
            });
            RSome(abi::Extension { layout: <abi::OpsExtensionV1 as abi_stable::StableAbi>::LAYOUT, module: module as *const () })
        }
        (abi::CONFIG_SCHEMA_EXTENSION, abi::CONFIG_SCHEMA_EXTENSION_VERSION) => {
            let module = *SCHEMA.get_or_init(|| {
                let m: &'static abi::ConfigSchemaExtensionV1 =
                    Box::leak(Box::new(abi::ConfigSchemaExtensionV1 { config_schema: config_schema::<S> }));
                m as *const abi::ConfigSchemaExtensionV1 as usize
            });
            RSome(abi::Extension { layout: <abi::ConfigSchemaExtensionV1 as abi_stable::StableAbi>::LAYOUT, module: module as *const () })
        }
        _ => RNone,
    }
}

/// The strategy's config schema as JSON (none without one).
extern "C" fn config_schema<S: Strategy>() -> GResult<ROption<RString>> {
    guard("config_schema", || Ok(S::config_schema().map(|s| RString::from(s.to_json())).into()))
}

/// Keeps the host's extra ops for [`crate::ops`].
extern "C" fn connect(host: &'static abi::HostOpsV1Ext) {
    let _ = crate::ops::HOST_EXT.set(host);
}

extern "C" fn init_param<S: Strategy>(
    strategy: &abi::StrategyBox,
    ops: HostOps_TO<'_, RMut<'_, ()>>,
    layer: &LayerInfo,
    name: RStr<'_>,
) -> GResult<TensorId> {
    guard("init_param", || {
        let Ok(g) = strategy.obj.downcast_as::<Guarded<S>>() else {
            return Err(Error::msg("init_param: the strategy object was not made by this plugin"));
        };
        with_ops(ops, false, 0, |ops| Ok(g.inner.init_param(ops, layer, name.as_str())?.id()))
    })
}

/// The root module for strategy `S` (called once, by the library header's constructor).
pub fn root_module<S: Strategy>() -> PluginModRef {
    PluginMod { abi_version, manifest: manifest::<S>, new_strategy: new_strategy::<S>, extension: extension::<S> }.leak_into_prefix()
}

//! Write graft strategy plugins.
//!
//! A plugin is a `cdylib` crate that depends on this crate only (never on candle or the host).
//! It implements [`Strategy`] and exports it with [`export_strategy!`]:
//!
//! ```ignore
//! use graft_sdk::prelude::*;
//!
//! struct MyStrategy { /* scalars only: parameters live in the host */ }
//!
//! impl Strategy for MyStrategy {
//!     fn manifest() -> Manifest { Manifest::new("my-strategy", env!("CARGO_PKG_VERSION")) }
//!     fn new(config: &str) -> Result<Self> { /* parse with graft_sdk::config::parse */ }
//!     fn plan(&mut self, layers: &[LayerInfo], config: &str) -> Result<Plan> { /* ... */ }
//!     fn forward<'o>(&self, ops: Ops<'o>, layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>> {
//!         let x = inputs.input()?;
//!         let down = ops.get_param("down");
//!         let up = ops.get_param("up");
//!         Ok(inputs.base_out()? + x.matmul(down.t()).matmul(up.t()) * 0.5)
//!     }
//! }
//!
//! graft_sdk::export_strategy!(MyStrategy);
//! ```
//!
//! Tensor operations run in the host through [`Ops`]; [`Tensor`] is a handle with methods and
//! operators. An op that fails (unknown handle, shape mismatch) does not panic: it poisons the
//! call, the following ops are skipped, and the entry point returns the first error. Every entry
//! point runs inside `catch_unwind`, so a panic becomes an error the host reports (and the host
//! keeps running). See docs/PLUGINS.md for the guide.

pub mod config;
mod error;
mod guard;
pub mod layers;
mod ops;
mod plan;
pub mod schema;
pub mod state;
pub mod testing;

pub use error::{Error, Result};
pub use graft_abi::{
    AttentionKind, BlockKind, BlockPosition, Component, ConvGeometry, ErrorKind, Init, InitKind, LayerInfo, LayerKind, LogLevel, TensorId,
    ABI_VERSION,
};
pub use layers::LayerMatcher;
pub use ops::{Inputs, Ops, Tensor};
pub use plan::{Attachment, BaseUnfreeze, Directive, Export, Manifest, OptimizerGroup, ParamSpec, Plan, Stage};
pub use schema::{ConfigKey, ConfigSchema};

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::{
        bail, config, Attachment, BaseUnfreeze, Component, ConfigKey, ConfigSchema, Directive, Error, Export, Init, Inputs, LayerInfo,
        LayerKind, LayerMatcher, Manifest, Ops, OptimizerGroup, ParamSpec, Plan, Result, Stage, Strategy, Tensor,
    };
}

/// A strategy: what a plugin implements. One object is created per configured run.
///
/// A strategy holds no tensors: its parameters live in the host (create them in `plan`, read
/// them with [`Ops::get_param`]). Private scalars that must survive a hot reload go through
/// `save_state` / `load_state`.
pub trait Strategy: Sized + Send + Sync + 'static {
    /// Who the plugin is. `abi_version` is filled in by the SDK.
    fn manifest() -> Manifest;

    /// Every key the configuration accepts, with type, default, range and help (see
    /// [`schema`]): the host shows it, draws the serve UI's form from it and checks a
    /// configuration against it before calling `new`. `None` (the default): no schema; the
    /// configuration is free JSON. List exactly the keys `new` accepts.
    fn config_schema() -> Option<ConfigSchema> {
        None
    }

    /// A strategy for one run, from its configuration (JSON; `{}` when the user gave none).
    /// Parse it with [`config::parse`] for a clear error on a bad key.
    fn new(config: &str) -> Result<Self>;

    /// Which layers to attach to, with which parameters, optimizer groups, base weights to
    /// unfreeze and stages. Called again after a hot reload. `config` is the JSON `new` got
    /// (most strategies parse it in `new` and ignore it here).
    fn plan(&mut self, layers: &[LayerInfo], config: &str) -> Result<Plan>;

    /// The output that replaces the hook point's output: `inputs.base_out()` for a linear,
    /// `inputs.out()` for an attention module, plus the adapter's contribution.
    fn forward<'o>(&self, ops: Ops<'o>, layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>>;

    /// The adapter as a weight difference `[out, in]`, when it is linear in the input (used to
    /// fuse it into the base weight, merge and export). `None`: not linear.
    fn delta_weight<'o>(&self, ops: Ops<'o>, layer: &LayerInfo) -> Result<Option<Tensor<'o>>> {
        let _ = (ops, layer);
        Ok(None)
    }

    /// Called before each optimizer step; staged strategies return their directives here.
    fn on_step(&mut self, step: u64) -> Result<Vec<Directive>> {
        let _ = step;
        Ok(Vec::new())
    }

    /// The tensors to save for one layer. The default exports the layer's `delta_weight` as a
    /// full `diff` when there is one.
    fn export<'o>(&self, ops: Ops<'o>, layer: &LayerInfo) -> Result<Option<Export<'o>>> {
        Ok(self.delta_weight(ops, layer)?.map(Export::Diff))
    }

    /// Private scalars (JSON) kept across a hot reload and in checkpoints.
    fn save_state(&self) -> Result<String> {
        Ok("{}".to_string())
    }

    fn load_state(&mut self, state: &str) -> Result<()> {
        let _ = state;
        Ok(())
    }

    /// The initial value of parameter `name` of `layer`, for parameters declared with
    /// [`Init::from_layer`]: computed through `ops` from [`Ops::base_weight`] and
    /// [`Ops::base_bias`], with the declared shape. The host calls it when it creates the
    /// parameter and on a `Reset` directive (DoRA's magnitude is the row norms of `W`).
    fn init_param<'o>(&self, ops: Ops<'o>, layer: &LayerInfo, name: &str) -> Result<Tensor<'o>> {
        let _ = ops;
        bail!("parameter `{name}` of `{}` is declared from_layer, but this strategy has no init_param", layer.name())
    }
}

/// Exports a [`Strategy`] type as the plugin's root module.
///
/// Every entry point is wrapped in `catch_unwind`: a panic becomes an error value that the host
/// reports, instead of aborting the host.
#[macro_export]
macro_rules! export_strategy {
    ($strategy:ty) => {
        fn __graft_root_module() -> $crate::__private::PluginModRef {
            $crate::__private::root_module::<$strategy>()
        }

        /// The abi_stable library header (the symbol the host looks up).
        #[allow(non_upper_case_globals)]
        #[unsafe(no_mangle)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::__private::LibHeader = {
            extern "C" fn __graft_erased_root_module() -> $crate::__private::RootModuleResult {
                $crate::__private::call_root_module_loader(__graft_root_module)
            }
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::__private::PluginModRef>(
                    __graft_erased_root_module,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

/// Returns early with an [`Error`] built like `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::Error::msg(format!($($arg)*)))
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::guard::root_module;
    pub use abi_stable::library::{__call_root_module_loader as call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult};
    pub use graft_abi::PluginModRef;
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_macro_uses_abi_stable_symbol_name() {
        assert_eq!("_1as_0lib_1header_0root_bmodule_bloader", abi_stable::library::ROOT_MODULE_LOADER_NAME);
    }
}

//! Test fixture: exports a `graft_plugin` root module whose layout is not graft's (as a plugin
//! built against a different, incompatible graft-abi would). abi_stable's layout check must
//! refuse it before any of its functions is called.

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::RString;
use abi_stable::{declare_root_module_statics, export_root_module, package_version_strings, StableAbi};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    pub abi_version: extern "C" fn() -> u32,
    /// graft's returns a `GResult<Manifest>`.
    #[sabi(last_prefix_field)]
    pub manifest: extern "C" fn() -> RString,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "graft_plugin";
    const NAME: &'static str = "graft_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

extern "C" fn abi_version() -> u32 {
    1
}

extern "C" fn manifest() -> RString {
    "fault-layout".into()
}

#[export_root_module]
pub fn root_module() -> PluginModRef {
    PluginMod { abi_version, manifest }.leak_into_prefix()
}

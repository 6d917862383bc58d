//! Test fixture: the right root-module layout, but built "for" graft ABI 999. The host must
//! refuse it with a message naming both versions.

use abi_stable::export_root_module;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{RNone, ROption, RResult, RStr, RVec};
use graft_abi::{Extension, GResult, GraftError, Manifest, PluginMod, PluginModRef, StrategyBox};

const CLAIMED_ABI: u32 = 999;

extern "C" fn abi_version() -> u32 {
    CLAIMED_ABI
}

extern "C" fn manifest() -> GResult<Manifest> {
    RResult::ROk(Manifest {
        id: "fault-abi-version".into(),
        version: "0.1.0".into(),
        abi_version: CLAIMED_ABI,
        description: "Claims another ABI version (test fixture)".into(),
        capabilities: RVec::new(),
        config_example: "{}".into(),
    })
}

extern "C" fn new_strategy(_config: RStr<'_>) -> GResult<StrategyBox> {
    RResult::RErr(GraftError::other("this fixture never makes a strategy"))
}

extern "C" fn extension(_name: RStr<'_>, _version: u32) -> ROption<Extension> {
    RNone
}

#[export_root_module]
pub fn root_module() -> PluginModRef {
    PluginMod { abi_version, manifest, new_strategy, extension }.leak_into_prefix()
}

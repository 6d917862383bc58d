//! Property tests over everything graft reads from users (the in-suite half of the fuzzing; the
//! coverage-guided half is `fuzz/`, run by `tools/fuzz.sh`): safetensors headers and adapter key
//! families, kohya dataset TOML, sample-prompt files, graft's own config files (training,
//! compare, `[plugins]`), images, PNG parameters and the `<lora:...>` prompt syntax.
//!
//! Each property: random and corrupted input never panics, an error names the file (or the
//! text) it is about, and no allocation grows with a size written in the input: a counting
//! allocator records the largest single allocation of the thread under test.
//!
//! Case counts are chosen to keep this file at a few seconds; `PROPTEST_CASES=10000` runs more.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use graft_formats::read::read_bytes;
use graft_formats::KeyMap;
use graft_host::generate::prompt_syntax::{extract_adapter_tags, parse_adapter_spec};
use graft_trainer::dataset::{DatasetConfig, OpenOptions};
use graft_trainer::samples::{parse_prompts, SampleDefaults};
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

// ------------------------------------------------------------------ allocation tracking

/// The system allocator, recording the largest single allocation per thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size)
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let out = f();
    (out, LARGEST.with(|c| c.get()))
}

// ------------------------------------------------------------------ helpers

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(cases),
        // Regressions are printed; nothing is written into the source tree.
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

/// A scratch folder of this module (one per thread, so properties may run in parallel).
fn scratch_dir(name: &str) -> PathBuf {
    let dir = graft_tests::workspace().join("target/test-scratch/reliability_fuzz").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny model's hook points as a key map, and its layer names.
fn tiny_keys() -> &'static (KeyMap, Vec<graft_sdxl::LayerInfo>, graft_sdxl::sgm::SgmLayout) {
    static KEYS: OnceLock<(KeyMap, Vec<graft_sdxl::LayerInfo>, graft_sdxl::sgm::SgmLayout)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = graft_tests::tiny_model();
        let config = graft_sdxl::SdxlConfig::from_diffusers_folder(&dir).unwrap();
        let layers = graft_sdxl::model::layers_of(&config).unwrap();
        let read = |c: &str| std::fs::read_to_string(dir.join(c).join("config.json")).unwrap();
        let layout = graft_sdxl::sgm::SgmLayout::from_configs(
            &graft_sdxl::unet::UNetConfig::from_json_str(&read("unet"), "unet").unwrap(),
            &graft_sdxl::vae::VaeConfig::from_json_str(&read("vae"), "vae").unwrap(),
            &graft_sdxl::clip::ClipConfig::from_json_str(&read("text_encoder_2"), "te2").unwrap(),
        )
        .unwrap();
        (KeyMap::from_layers(&layers, &layout), layers, layout)
    })
}

fn dtype_size(d: Dtype) -> usize {
    match d {
        Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
        Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
        _ => 1,
    }
}

/// A safetensors file with these tensors (data: `fill` repeated) and metadata.
fn safetensors_file(tensors: &[(String, Dtype, Vec<usize>)], metadata: &[(String, String)], fill: u8) -> Vec<u8> {
    let mut unique: Vec<&(String, Dtype, Vec<usize>)> = Vec::new();
    for t in tensors {
        if !unique.iter().any(|u| u.0 == t.0) {
            unique.push(t);
        }
    }
    let data: Vec<Vec<u8>> = unique
        .iter()
        .map(|(_, d, s)| {
            let n: usize = s.iter().product::<usize>() * dtype_size(*d);
            (0..n).map(|i| fill.wrapping_add((i * 37 % 251) as u8) & 0x3f).collect()
        })
        .collect();
    let views: Vec<(String, TensorView)> =
        unique.iter().zip(&data).map(|((name, d, s), bytes)| (name.clone(), TensorView::new(*d, s.clone(), bytes).unwrap())).collect();
    let meta: HashMap<String, String> = metadata.iter().cloned().collect();
    safetensors::serialize(views, if meta.is_empty() { None } else { Some(meta) }).unwrap()
}

/// A valid little adapter file of the tiny model: a kohya LoRA on one layer.
fn valid_adapter() -> Vec<u8> {
    let (_, layers, layout) = tiny_keys();
    let l = layers.iter().find(|l| l.name.ends_with("attn2.to_k") && l.name.starts_with("unet")).unwrap();
    let k = graft_formats::to_kohya(&l.name, layout).unwrap();
    safetensors_file(
        &[
            (format!("{k}.lora_down.weight"), Dtype::F32, vec![2, l.in_features]),
            (format!("{k}.lora_up.weight"), Dtype::F16, vec![l.out_features, 2]),
            (format!("{k}.alpha"), Dtype::F32, vec![]),
        ],
        &[("ss_network_dim".into(), "2".into())],
        3,
    )
}

/// Byte-level corruption of a valid input: overwrite, insert, delete, truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    /// Overwrite 8 bytes at the position with a little-endian integer (a length field).
    Length(usize, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let lengths = prop_oneof![Just(u64::MAX), Just(1u64 << 63), Just(1u64 << 40), Just(100_000_001u64), any::<u64>(), 0u64..4096];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (prop_oneof![Just(0usize), any::<usize>()], lengths).prop_map(|(i, v)| Mutation::Length(i, v)),
    ]
}

fn mutate(mut bytes: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = bytes.len().max(1);
        match m {
            Mutation::Set(i, b) if !bytes.is_empty() => bytes[i % len] = *b,
            Mutation::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Delete(i, n) if !bytes.is_empty() => {
                let at = i % len;
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
            Mutation::Truncate(n) => bytes.truncate(n % (bytes.len() + 1)),
            Mutation::Length(i, v) if bytes.len() >= 8 => {
                let at = i % (bytes.len() - 7);
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
    bytes
}

/// The largest allocation a reader may make for an input of `len` bytes: a few times the input
/// (f16 -> f32 doubles it) plus slack for bookkeeping, never something a header field asked for.
fn allocation_bound(len: usize) -> usize {
    4 * len + (1 << 20)
}

// ------------------------------------------------------------------ safetensors headers

#[test]
fn a_giant_header_length_is_refused_before_allocating() {
    let dir = scratch_dir("giant");
    let path = dir.join("giant.safetensors");
    for claimed in [u64::MAX, 1 << 63, 1 << 40, 1 << 32, 100_000_001, 99_999_999, 1 << 20] {
        let mut bytes = claimed.to_le_bytes().to_vec();
        bytes.extend_from_slice(br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#);
        std::fs::write(&path, &bytes).unwrap();
        let (r, peak) = largest_alloc_of(|| read_bytes(&bytes, &path).map(|_| ()).map_err(|e| e.to_string()));
        let e = r.unwrap_err();
        assert!(e.contains("giant.safetensors") && e.contains("not a valid safetensors file"), "{claimed}: {e}");
        assert!(peak < 64 << 10, "{claimed}: read_bytes allocated {peak} bytes");
        // The same from disk: the adapter reader, the header-only reader of --lora-dir, the
        // memory-mapped model reader and candle's loader (checkpoints).
        let (r, peak) = largest_alloc_of(|| graft_formats::read::read_file(&path).map(|_| ()).map_err(|e| e.to_string()));
        assert!(r.unwrap_err().contains("giant.safetensors"));
        assert!(peak < 64 << 10, "{claimed}: read_file allocated {peak} bytes");
        let (r, peak) = largest_alloc_of(|| graft_host::generate::lora_dir::read_header(&path).map(|_| ()).map_err(|e| format!("{e:#}")));
        assert!(r.unwrap_err().contains("giant.safetensors"));
        assert!(peak < 64 << 10, "{claimed}: read_header allocated {peak} bytes");
        let (r, peak) =
            largest_alloc_of(|| graft_sdxl::varbuilder::open_safetensors(std::slice::from_ref(&path)).map(|_| ()).map_err(|e| e.to_string()));
        let e = r.unwrap_err();
        assert!(e.contains("giant.safetensors") && e.contains("corrupt or truncated"), "{e}");
        assert!(peak < 64 << 10, "{claimed}: open_safetensors allocated {peak} bytes");
        let (r, peak) = largest_alloc_of(|| candle_core::safetensors::load(&path, &candle_core::Device::Cpu).map(|_| ()));
        assert!(r.is_err());
        assert!(peak < 64 << 10, "{claimed}: candle's load allocated {peak} bytes");
    }
}

fn largest_alloc_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    largest_allocation(f)
}

proptest! {
    #![proptest_config(config(512))]

    /// Random bytes and corrupted adapter files: an error naming the file, or a file that reads;
    /// never a panic, never an allocation beyond a few times the input.
    #[test]
    fn safetensors_bytes_never_panic(
        random in proptest::collection::vec(any::<u8>(), 0..256),
        muts in proptest::collection::vec(mutation(), 1..6),
        use_random in any::<bool>(),
    ) {
        let bytes = if use_random { random } else { mutate(valid_adapter(), &muts) };
        let path = Path::new("/fuzz/in.safetensors");
        let (r, peak) = largest_allocation(|| read_bytes(&bytes, path).map_err(|e| e.to_string()));
        prop_assert!(peak <= allocation_bound(bytes.len()), "allocated {} for {} bytes", peak, bytes.len());
        match r {
            Err(e) => prop_assert!(e.contains("/fuzz/in.safetensors"), "{}", e),
            Ok(raw) => {
                // It parsed: the adapter reader must account for it or refuse it clearly.
                let (keys, _, _) = tiny_keys();
                match graft_formats::read_raw(&raw, keys) {
                    Err(e) => prop_assert!(e.to_string().contains("/fuzz/in.safetensors"), "{}", e),
                    Ok((file, _)) => {
                        for m in &file.modules {
                            let _ = m.delta_weight(1.0);
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ adapter key families

/// Suffixes of every key family graft reads, and some it does not.
const SUFFIXES: [&str; 24] = [
    "lora_down.weight",
    "lora_up.weight",
    "alpha",
    "lora_A.weight",
    "lora_B.weight",
    "lora.down.weight",
    "lora.up.weight",
    "lora_linear_layer.down.weight",
    "lora_linear_layer.up.weight",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "diff",
    "diff_b",
    "dora_scale",
    "weight",
];

#[derive(Debug, Clone)]
enum Naming {
    Kohya,
    KohyaDiffusers,
    Peft,
    PeftOld,
    Junk(String),
}

fn key_entry() -> impl Strategy<Value = (usize, Naming, usize, Dtype, Vec<usize>)> {
    let naming = prop_oneof![
        4 => Just(Naming::Kohya),
        1 => Just(Naming::KohyaDiffusers),
        3 => Just(Naming::Peft),
        1 => Just(Naming::PeftOld),
        1 => "[a-z_.0-9]{1,40}".prop_map(Naming::Junk),
    ];
    let dtype = prop_oneof![
        6 => Just(Dtype::F32),
        2 => Just(Dtype::F16),
        1 => Just(Dtype::BF16),
        1 => Just(Dtype::F64),
        1 => Just(Dtype::I64),
        1 => Just(Dtype::U8),
        1 => Just(Dtype::BOOL),
    ];
    // Dims: 0 means "the layer's in features", 1 its out features; others are literal sizes.
    let shape = proptest::collection::vec(prop_oneof![Just(usize::MAX), Just(usize::MAX - 1), 0usize..6, Just(8usize)], 0..4);
    (any::<usize>(), naming, 0..SUFFIXES.len(), dtype, shape)
}

/// A whole module of one family with consistent shapes (so deeper code runs), then maybe one
/// tweak: a dimension off by one, a key dropped, an integer dtype.
#[derive(Debug, Clone)]
struct Module {
    layer: usize,
    family: u8,
    rank: usize,
    alpha: Option<f32>,
    tweak: Option<(usize, u8)>,
}

fn module() -> impl Strategy<Value = Module> {
    let alpha = prop_oneof![Just(None), Just(Some(0.0f32)), Just(Some(1.0)), Just(Some(8.0)), Just(Some(f32::NAN)), Just(Some(-3.0))];
    let tweak = prop_oneof![3 => Just(None), 1 => (any::<usize>(), 0u8..3).prop_map(Some)];
    (any::<usize>(), 0u8..7, 1usize..5, alpha, tweak).prop_map(|(layer, family, rank, alpha, tweak)| Module {
        layer,
        family,
        rank,
        alpha,
        tweak,
    })
}

fn module_tensors(m: &Module) -> Vec<(String, Dtype, Vec<usize>)> {
    let (_, layers, layout) = tiny_keys();
    let linear: Vec<&graft_sdxl::LayerInfo> = layers.iter().filter(|l| l.kind == graft_sdxl::LayerKind::Linear).collect();
    let l = linear[m.layer % linear.len()];
    let (i, o, r) = (l.in_features, l.out_features, m.rank);
    let kohya = graft_formats::to_kohya(&l.name, layout).unwrap_or_else(|_| "lora_unet_x".into());
    let mut t: Vec<(String, Dtype, Vec<usize>)> = match m.family {
        0 => vec![(format!("{kohya}.lora_down.weight"), Dtype::F32, vec![r, i]), (format!("{kohya}.lora_up.weight"), Dtype::F16, vec![o, r])],
        1 => vec![(format!("{}.lora_A.weight", l.name), Dtype::F32, vec![r, i]), (format!("{}.lora_B.weight", l.name), Dtype::BF16, vec![o, r])],
        2 => vec![
            (format!("{kohya}.hada_w1_a"), Dtype::F32, vec![o, r]),
            (format!("{kohya}.hada_w1_b"), Dtype::F32, vec![r, i]),
            (format!("{kohya}.hada_w2_a"), Dtype::F32, vec![o, r]),
            (format!("{kohya}.hada_w2_b"), Dtype::F32, vec![r, i]),
        ],
        3 => vec![(format!("{kohya}.lokr_w1"), Dtype::F32, vec![1, 1]), (format!("{kohya}.lokr_w2"), Dtype::F32, vec![o, i])],
        4 => vec![
            (format!("{kohya}.lokr_w1"), Dtype::F32, vec![1, 1]),
            (format!("{kohya}.lokr_w2_a"), Dtype::F32, vec![o, r]),
            (format!("{kohya}.lokr_w2_b"), Dtype::F32, vec![r, i]),
        ],
        5 => vec![(format!("{kohya}.diff"), Dtype::F32, vec![o, i]), (format!("{kohya}.diff_b"), Dtype::F32, vec![o])],
        _ => vec![
            (format!("{kohya}.lora_down.weight"), Dtype::F32, vec![r, i]),
            (format!("{kohya}.lora_up.weight"), Dtype::F32, vec![o, r]),
            (format!("{kohya}.dora_scale"), Dtype::F32, if r % 2 == 0 { vec![o, 1] } else { vec![1, i] }),
        ],
    };
    if m.alpha.is_some() && m.family != 1 && m.family != 5 {
        t.push((format!("{kohya}.alpha"), Dtype::F32, vec![]));
    }
    if let Some((at, how)) = m.tweak {
        let n = t.len();
        let k = at % n;
        match how {
            0 => {
                let d = &mut t[k].2;
                if !d.is_empty() {
                    let j = at % d.len();
                    d[j] += 1;
                }
            }
            1 => {
                t.remove(k);
            }
            _ => t[k].1 = Dtype::I64,
        }
    }
    t
}

fn metadata_entry() -> impl Strategy<Value = (String, String)> {
    let key = prop_oneof![
        Just("lora_adapter_metadata".to_string()),
        Just("ss_network_alpha".to_string()),
        Just("ss_network_dim".to_string()),
        Just("ss_network_module".to_string()),
        Just("graft.strategy".to_string()),
        Just("graft.version".to_string()),
        Just("graft.config".to_string()),
        Just("graft.layers".to_string()),
        "[a-z_.]{1,20}",
    ];
    let value = prop_oneof![
        Just(r#"{"lora_alpha": 8, "r": 4}"#.to_string()),
        Just(r#"{"lora_alpha": "x", "r": -1, "rank_pattern": {"unet": 3}, "alpha_pattern": [1]}"#.to_string()),
        Just(r#"{"r": 0, "lora_alpha": 1e308}"#.to_string()),
        Just("networks.lora".to_string()),
        Just("NaN".to_string()),
        Just("{}".to_string()),
        Just("[".to_string()),
        "\\PC{0,30}",
    ];
    (key, value)
}

fn adapter_bytes(entries: &[(usize, Naming, usize, Dtype, Vec<usize>)], metadata: &[(String, String)]) -> Vec<u8> {
    let (_, layers, layout) = tiny_keys();
    let tensors: Vec<(String, Dtype, Vec<usize>)> = entries
        .iter()
        .map(|(li, naming, si, dtype, shape)| {
            let l = &layers[li % layers.len()];
            let suffix = SUFFIXES[*si];
            let name = match naming {
                Naming::Kohya => match graft_formats::to_kohya(&l.name, layout) {
                    Ok(k) => format!("{k}.{suffix}"),
                    Err(_) => format!("lora_unet_nothing.{suffix}"),
                },
                Naming::KohyaDiffusers => format!("lora_{}.{suffix}", l.name.replace('.', "_")),
                Naming::Peft => format!("{}.{suffix}", l.name),
                Naming::PeftOld => format!("{}.processor.to_q_lora.{suffix}", l.name),
                Naming::Junk(j) => format!("{j}.{suffix}"),
            };
            let dims = shape
                .iter()
                .map(|&d| match d {
                    usize::MAX => l.in_features,
                    x if x == usize::MAX - 1 => l.out_features,
                    x => x,
                })
                .collect();
            (name, *dtype, dims)
        })
        .collect();
    safetensors_file(&tensors, metadata, 7)
}

proptest! {
    #![proptest_config(config(384))]

    /// Random files of every key family (kohya SGM and diffusers names, PEFT and its older
    /// spellings, LyCORIS LoHa / LoKr / full / DoRA, graft-native metadata) with random shapes,
    /// dtypes and metadata: read, accounted for (every key attached or listed as unmatched), or
    /// refused with an error that names the file. The delta weights of what loads are computed.
    #[test]
    fn adapter_key_families_never_panic(
        entries in proptest::collection::vec(key_entry(), 0..6),
        modules in proptest::collection::vec(module(), 0..4),
        metadata in proptest::collection::vec(metadata_entry(), 0..3),
    ) {
        let mut bytes = adapter_bytes(&entries, &metadata);
        if !modules.is_empty() {
            let mut tensors: Vec<(String, Dtype, Vec<usize>)> = modules.iter().flat_map(module_tensors).collect();
            // The random entries too, so that complete and broken modules meet in one file.
            let random = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in random.tensors() {
                tensors.push((name, view.dtype(), view.shape().to_vec()));
            }
            bytes = safetensors_file(&tensors, &metadata, 11);
        }
        let path = Path::new("/fuzz/adapter.safetensors");
        let (keys, _, _) = tiny_keys();
        let (r, peak) = largest_allocation(|| {
            let raw = read_bytes(&bytes, path)?;
            let (file, report) = graft_formats::read_raw(&raw, keys)?;
            for m in &file.modules {
                let _ = m.delta_weight(0.7);
                let _ = m.delta_bias(0.7);
            }
            let _ = report.summary();
            Ok::<_, candle_core::Error>((file, report))
        });
        prop_assert!(peak <= allocation_bound(bytes.len()) + (8 << 20), "allocated {} for {} bytes", peak, bytes.len());
        match r {
            Err(e) => prop_assert!(e.to_string().contains("/fuzz/adapter.safetensors"), "{}", e),
            Ok((file, report)) => {
                prop_assert!(!file.modules.is_empty());
                prop_assert_eq!(report.attached.len(), file.modules.len());
            }
        }
    }
}

// ------------------------------------------------------------------ TOML configs

/// A TOML value of any type, with the edge cases a config reader meets.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        prop_oneof![Just(0i64), Just(1), Just(-1), Just(64), Just(1024), Just(1 << 40)].prop_map(|v| v.to_string()),
        prop_oneof![Just("nan"), Just("inf"), Just("-inf"), Just("0.5"), Just("-0.0"), Just("1e300")].prop_map(String::from),
        any::<bool>().prop_map(|v| v.to_string()),
        "[a-z0-9_./ ]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("\"../../etc\"".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("[]".to_string()),
    ]
}

fn toml_line(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    let key = prop_oneof![
        8 => proptest::sample::select(keys).prop_map(String::from),
        1 => "[a-z_]{1,12}",
    ];
    (key, toml_value()).prop_map(|(k, v)| format!("{k} = {v}"))
}

const DATASET_KEYS: [&str; 17] = [
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "num_repeats",
    "shuffle_caption",
    "keep_tokens",
    "caption_extension",
    "caption_separator",
    "caption_dropout_rate",
    "flip_aug",
    "class_tokens",
    "color_aug",
    "image_dir",
];

/// A kohya dataset TOML: [general], [[datasets]] and [[datasets.subsets]] in random order and
/// number, with known and unknown keys of any type; the image folder is sometimes a real one.
fn kohya_toml() -> impl Strategy<Value = String> {
    let section = prop_oneof![Just("[general]"), Just("[[datasets]]"), Just("[[datasets.subsets]]"), Just("[datasets]"), Just("datasets = 3")];
    let lines = proptest::collection::vec(toml_line(&DATASET_KEYS), 0..5);
    let real_dir = prop_oneof![Just(None), Just(Some("image_dir = \"data\"")), Just(Some("image_dir = \"missing\""))];
    proptest::collection::vec((section, lines, real_dir), 0..5).prop_map(|parts| {
        let mut text = String::new();
        for (s, lines, dir) in parts {
            text.push_str(s);
            text.push('\n');
            if let Some(d) = dir {
                text.push_str(d);
                text.push('\n');
            }
            for l in lines {
                text.push_str(&l);
                text.push('\n');
            }
        }
        text
    })
}

/// A folder with four small images and captions, written once.
fn dataset_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir("dataset");
        graft_tests::write_shapes_dataset(&dir.join("data"), 4, 48);
        dir
    })
    .clone()
}

proptest! {
    #![proptest_config(config(384))]

    /// kohya dataset configs: parsed and opened (buckets placed, an epoch's batches made), or one
    /// error naming the config.
    #[test]
    fn kohya_dataset_configs_never_panic(text in kohya_toml(), skip_bad in any::<bool>(), seed in any::<u64>()) {
        let base = dataset_dir();
        match DatasetConfig::from_toml_str(&text, "fuzz-dataset.toml", &base) {
            Err(e) => prop_assert!(e.to_string().contains("fuzz-dataset.toml"), "{}", e),
            Ok(cfg) => {
                let (r, peak) = largest_allocation(|| {
                    graft_trainer::dataset::Dataset::open(&cfg, &OpenOptions { skip_bad, verify_images: false })
                        .map(|ds| {
                            let epoch = ds.epoch(seed, 0).without_images();
                            let n = epoch.len();
                            if n > 0 {
                                let _ = epoch.batch(seed as usize % n);
                            }
                            n
                        })
                });
                prop_assert!(peak < 64 << 20, "opening the dataset allocated {} bytes", peak);
                if let Err(e) = r {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    /// Any text at all as a dataset config.
    #[test]
    fn any_text_as_a_dataset_config(text in "\\PC{0,200}") {
        if let Err(e) = DatasetConfig::from_toml_str(&text, "fuzz-dataset.toml", Path::new("/nonexistent")) {
            prop_assert!(e.to_string().contains("fuzz-dataset.toml"), "{}", e);
        }
    }
}

const TRAIN_KEYS: [&str; 22] = [
    "model",
    "model_config",
    "output_dir",
    "output_name",
    "seed",
    "steps",
    "batch_size",
    "gradient_accumulation",
    "prediction_type",
    "noise_offset",
    "min_snr_gamma",
    "max_grad_norm",
    "lr_schedule",
    "warmup_steps",
    "save_every",
    "sample_every",
    "sample_prompts",
    "cache_latents",
    "max_bad_steps",
    "plugin",
    "config",
    "dir",
];

/// A training config: the top-level keys, [dataset] and [strategy], each key of any type.
fn train_toml() -> impl Strategy<Value = String> {
    let top = proptest::collection::vec(toml_line(&TRAIN_KEYS), 0..8);
    let dataset = proptest::collection::vec(toml_line(&DATASET_KEYS), 0..4);
    let strategy = proptest::collection::vec(toml_line(&TRAIN_KEYS), 0..3);
    let valid = any::<bool>();
    (top, dataset, strategy, valid).prop_map(|(top, dataset, strategy, valid)| {
        let mut text = String::new();
        if valid {
            text.push_str("model = \"m\"\noutput_dir = \"o\"\nsteps = 2\n");
        }
        for l in top {
            text.push_str(&l);
            text.push('\n');
        }
        text.push_str("[dataset]\n");
        if valid {
            text.push_str("dir = \"d\"\n");
        }
        for l in dataset {
            text.push_str(&l);
            text.push('\n');
        }
        text.push_str("[strategy]\n");
        if valid {
            text.push_str("plugin = \"lora\"\n");
        }
        for l in strategy {
            text.push_str(&l);
            text.push('\n');
        }
        text
    })
}

proptest! {
    #![proptest_config(config(256))]

    /// graft's own config files: the training config (read from a file, as `graft train` does),
    /// the compare config and a `graft.toml` with `[plugins] dirs`.
    #[test]
    fn graft_config_files_never_panic(text in train_toml(), junk in "\\PC{0,80}", use_junk in any::<bool>()) {
        let dir = scratch_dir(&format!("config-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        let text = if use_junk { junk } else { text };
        let path = dir.join("train.toml");
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = graft_trainer::config::TrainConfig::from_file(&path) {
            prop_assert!(format!("{e:#}").contains("train.toml"), "{:#}", e);
        }
        if let Err(e) = graft_host::compare::config::CompareConfig::parse_str(&text, "fuzz-compare.toml", &dir) {
            prop_assert!(format!("{e:#}").contains("fuzz-compare.toml"), "{:#}", e);
        }
        let plugins = format!("[plugins]\n{text}");
        std::fs::write(&path, &plugins).unwrap();
        if let Err(e) = graft_runtime::plugins::config_dirs(&path) {
            prop_assert!(format!("{e:#}").contains("train.toml"), "{:#}", e);
        }
    }
}

// ------------------------------------------------------------------ sample prompts

fn prompt_line() -> impl Strategy<Value = String> {
    let option = prop_oneof![
        Just("--w"),
        Just("--h"),
        Just("--d"),
        Just("--s"),
        Just("--l"),
        Just("--n"),
        Just("--ss"),
        Just("--W"),
        Just("--x"),
        Just("--"),
        Just("---"),
    ];
    let value = prop_oneof![
        any::<u64>().prop_map(|v| v.to_string()),
        prop_oneof![Just(0u64), Just(8), Just(64), Just(1024), Just(u64::MAX), Just(u64::MAX - 7), Just(usize::MAX as u64 / 8 * 8)]
            .prop_map(|v| v.to_string()),
        prop_oneof![Just("nan"), Just("inf"), Just("-1"), Just("7.5"), Just("1e400"), Just(""), Just("euler_a"), Just("DPM++ 2M Karras")]
            .prop_map(String::from),
        "\\PC{0,12}",
    ];
    let words = "[a-z ,<>:#]{0,20}";
    (words, proptest::collection::vec((option, value), 0..5)).prop_map(|(w, opts)| {
        let mut line = w;
        for (o, v) in opts {
            line.push_str(&format!(" {o} {v}"));
        }
        line
    })
}

proptest! {
    #![proptest_config(config(512))]

    /// kohya sample-prompt files: every prompt valid (size a positive multiple of 8, steps > 0,
    /// finite guidance) or an error naming the file and line.
    #[test]
    fn sample_prompt_files_never_panic(lines in proptest::collection::vec(prompt_line(), 0..6), junk in "\\PC{0,100}", use_junk in any::<bool>()) {
        let text = if use_junk { junk } else { lines.join("\n") };
        match parse_prompts(&text, "fuzz-prompts.txt", &SampleDefaults::default()) {
            Err(e) => prop_assert!(format!("{e:#}").contains("fuzz-prompts.txt:"), "{:#}", e),
            Ok(prompts) => {
                for p in prompts {
                    prop_assert!(p.width > 0 && p.width % 8 == 0 && p.height > 0 && p.height % 8 == 0, "{:?}", p);
                    prop_assert!(p.steps > 0 && p.guidance.is_finite(), "{:?}", p);
                    // A size the pipeline would have to allocate latents for is bounded.
                    prop_assert!(p.width <= graft_sdxl::pipeline::MAX_SIDE && p.height <= graft_sdxl::pipeline::MAX_SIDE, "{:?}", p);
                }
            }
        }
    }
}

// ------------------------------------------------------------------ the <lora:...> syntax

fn prompt_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => "[a-z ,]{0,8}",
        2 => Just("<".to_string()),
        2 => Just(">".to_string()),
        2 => Just(":".to_string()),
        1 => Just("=".to_string()),
        2 => Just("<lora:".to_string()),
        1 => Just("<lyco:".to_string()),
        1 => Just("<hypernet:".to_string()),
        1 => Just("te=".to_string()),
        1 => Just("unet=".to_string()),
        2 => prop_oneof![Just("0.5"), Just("-1"), Just("nan"), Just("inf"), Just("1e999"), Just("")].prop_map(String::from),
        1 => "\\PC{1,3}",
        1 => Just("é💥".to_string()),
    ];
    proptest::collection::vec(piece, 0..16).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(1024))]

    /// A1111 prompt tags: the prompt without its tags and finite weights, or one error naming the
    /// tag; the text is never longer than the prompt.
    #[test]
    fn lora_prompt_syntax_never_panics(prompt in prompt_text()) {
        match extract_adapter_tags(&prompt) {
            Ok((text, tags)) => {
                prop_assert!(text.len() <= prompt.len());
                for t in tags {
                    prop_assert!(!t.name.trim().is_empty());
                    prop_assert!(t.te_weight.is_finite() && t.unet_weight.is_finite(), "{:?}", t);
                }
            }
            Err(e) => prop_assert!(format!("{e:#}").contains("prompt tag `<"), "{:#}", e),
        }
        // The same text as an --adapter argument (no such file: an error naming it).
        if let Err(e) = parse_adapter_spec(&prompt) {
            prop_assert!(format!("{e:#}").contains("--adapter"), "{:#}", e);
        }
    }
}

// ------------------------------------------------------------------ images

/// A small image encoded as PNG, JPEG or WebP.
fn encoded_image(format: u8, w: u32, h: u32) -> (Vec<u8>, &'static str) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let (fmt, ext) = match format % 3 {
        0 => (image::ImageFormat::Png, "png"),
        1 => (image::ImageFormat::Jpeg, "jpg"),
        _ => (image::ImageFormat::WebP, "webp"),
    };
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, fmt).unwrap();
    (out.into_inner(), ext)
}

/// Sets the width and height of a PNG's IHDR and fixes its CRC, so the decoder believes them.
fn png_claiming(mut png: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
    // 8-byte signature, then IHDR: length (4), "IHDR" (4), width (4), height (4), ... CRC.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

proptest! {
    #![proptest_config(config(192))]

    /// Training images: random sizes (extreme aspect ratios included) against random bucket
    /// settings, and corrupted PNG / JPEG / WebP bytes (a PNG claiming a giant size included):
    /// placed and loaded, or listed as a problem naming the file; never a panic, never an
    /// allocation for the size a header claims. PNG `parameters` (A1111 metadata) the same.
    #[test]
    fn images_never_panic(
        format in any::<u8>(),
        w in 1u32..160,
        h in 1u32..160,
        muts in proptest::collection::vec(mutation(), 0..4),
        giant in prop_oneof![
            Just(None),
            Just(Some((100_000u32, 100_000u32))),
            Just(Some((u32::MAX, 1))),
            Just(Some((0, 5))),
            // Under the decoder's default 512 MB, over graft's side and memory limits.
            Just(Some((24, 4_980_752))),
            Just(Some((16_384, 10_000))),
        ],
        resolution in prop_oneof![Just(64usize), Just(32), Just(128)],
        enable_bucket in any::<bool>(),
        steps in prop_oneof![Just(8usize), Just(64), Just(1)],
    ) {
        let dir = scratch_dir(&format!("images-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        let _ = std::fs::remove_dir_all(dir.join("img"));
        std::fs::create_dir_all(dir.join("img")).unwrap();
        let (bytes, ext) = encoded_image(format, w, h);
        let bytes = match giant {
            Some((gw, gh)) if ext == "png" => png_claiming(bytes, gw, gh),
            _ => mutate(bytes, &muts),
        };
        let path = dir.join(format!("img/a.{ext}"));
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write(dir.join("img/a.txt"), "a caption").unwrap();
        let toml = format!(
            "[general]\nresolution = {resolution}\nenable_bucket = {enable_bucket}\nbucket_reso_steps = {steps}\n\
             min_bucket_reso = 8\nmax_bucket_reso = 256\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"img\"\n"
        );
        let cfg = DatasetConfig::from_toml_str(&toml, "images.toml", &dir);
        let (r, peak) = largest_allocation(|| -> anyhow::Result<()> {
            let cfg = cfg?;
            let ds = graft_trainer::dataset::Dataset::open(&cfg, &OpenOptions { skip_bad: false, verify_images: true })?;
            let t = ds.load_image(0, true)?;
            anyhow::ensure!(t.dims().len() == 3 && t.dims()[0] == 3, "image tensor {:?}", t.dims());
            Ok(())
        });
        prop_assert!(peak < 64 << 20, "loading a {}-byte image allocated {} bytes", bytes.len(), peak);
        if let Err(e) = r {
            let e = format!("{e:#}");
            prop_assert!(e.contains("a.") || e.contains("images.toml") || e.contains("resolution") || e.contains("bucket"), "{}", e);
        }
        if ext == "png" {
            let (r, peak) = largest_allocation(|| graft_trainer::png_out::read_parameters(&path));
            prop_assert!(peak < 64 << 20, "reading PNG parameters allocated {} bytes", peak);
            if let Err(e) = r {
                prop_assert!(format!("{e:#}").contains("a.png"), "{:#}", e);
            }
        }
    }
}

/// A tiny PNG claiming a size the decoder's own limit (512 MB) would allow but graft's limits do
/// not: refused, naming the file, before the pixel buffer is allocated (found by cargo-fuzz: a
/// 76-byte PNG claiming 24 x 4,980,752 pixels made graft allocate 358 MB).
#[test]
fn a_giant_image_header_is_refused_before_allocating() {
    let dir = scratch_dir("giant-image");
    for (w, h) in [(24u32, 4_980_752u32), (16_384, 10_000), (100_000, 100_000)] {
        let _ = std::fs::remove_dir_all(dir.join("img"));
        std::fs::create_dir_all(dir.join("img")).unwrap();
        let (png, _) = encoded_image(0, 8, 8);
        std::fs::write(dir.join("img/big.png"), png_claiming(png, w, h)).unwrap();
        std::fs::write(dir.join("img/big.txt"), "big").unwrap();
        let toml = "[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"img\"\n";
        let cfg = DatasetConfig::from_toml_str(toml, "big.toml", &dir).unwrap();
        for verify_images in [false, true] {
            let (r, peak) = largest_allocation(|| {
                graft_trainer::dataset::Dataset::open(&cfg, &OpenOptions { skip_bad: false, verify_images })
                    .and_then(|ds| ds.load_image(0, false))
                    .map(|_| ())
            });
            let e = r.unwrap_err().to_string();
            assert!(e.contains("big.png"), "{w}x{h}: {e}");
            assert!(peak < 16 << 20, "{w}x{h} (verify {verify_images}): allocated {peak} bytes");
        }
    }
}

// ------------------------------------------------------------------ models: safetensors only

/// Models and adapters are read from safetensors only: a pickle (`.bin`, `.ckpt`, `.pt`) is
/// refused with a message that says why, whatever its name.
#[test]
fn pickle_files_are_never_read() {
    let dir = scratch_dir("weights");
    // The start of a torch.save zip and of a protocol-2 pickle.
    let zip = b"PK\x03\x04\x00\x00\x08\x08\x00\x00archive/data.pkl".to_vec();
    let pickle = b"\x80\x02}q\x00(X\x05\x00\x00\x00statecposix\nsystem\n".to_vec();
    for (name, bytes) in [("model.ckpt", &zip), ("lora.pt", &pickle), ("lora.safetensors", &pickle), ("model.bin", &zip)] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = graft_formats::read::read_file(&path).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("pickle"), "{name}: {e}");
        let e = graft_sdxl::varbuilder::open_safetensors(std::slice::from_ref(&path)).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("pickle"), "{name}: {e}");
        let e = format!("{:#}", graft_host::generate::lora_dir::read_header(&path).unwrap_err());
        assert!(e.contains(name), "{name}: {e}");
        let e = graft_sdxl::SdxlModel::load(&path, None, &candle_core::Device::Cpu).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("pickle"), "{name}: {e}");
    }
    // A real safetensors file is read whatever its name.
    let named_bin = dir.join("adapter.bin");
    std::fs::write(&named_bin, valid_adapter()).unwrap();
    graft_formats::read::read_file(&named_bin).unwrap();
    // A diffusers folder with pickle weights only.
    let model = dir.join("model");
    graft_tests::copy_dir(&graft_tests::tiny_model(), &model);
    let unet = model.join("unet");
    for f in std::fs::read_dir(&unet).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            std::fs::rename(&p, unet.join("diffusion_pytorch_model.bin")).unwrap();
        }
    }
    let e = graft_sdxl::SdxlModel::load(&model, None, &candle_core::Device::Cpu).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("pickle") && e.contains("safetensors only"), "{e}");
}

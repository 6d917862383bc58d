//! Timing and memory of one workload.

use std::time::Instant;

use candle_core::Device;

use serde_json::{Map, Value};

/// Resident memory figures of this process, in MB (Linux /proc; 0 elsewhere).
fn status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

pub fn peak_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Resets the resident high-water mark to the current resident size.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Median and minimum of some run times, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub runs: usize,
}

impl Timing {
    pub fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(|a, b| a.total_cmp(b));
        let runs = ms.len();
        let median_ms = if runs == 0 {
            f64::NAN
        } else if runs % 2 == 1 {
            ms[runs / 2]
        } else {
            (ms[runs / 2 - 1] + ms[runs / 2]) / 2.0
        };
        Self { median_ms, min_ms: ms.first().copied().unwrap_or(f64::NAN), runs }
    }
}

/// Times `f` once.
pub fn time_ms(f: &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// What a workload measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub timing: Timing,
    pub peak_mb: f64,
    pub delta_mb: f64,
    pub extra: Map<String, Value>,
}

impl Measured {
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    pub fn record(self, workload: &str) -> Record {
        Record {
            workload: workload.to_string(),
            side: "graft".into(),
            ms: self.timing.median_ms,
            min_ms: self.timing.min_ms,
            runs: self.timing.runs,
            peak_mb: self.peak_mb,
            delta_mb: self.delta_mb,
            threads: rayon::current_num_threads(),
            extra: self.extra,
        }
    }
}

/// One output line.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub workload: String,
    pub side: String,
    pub ms: f64,
    pub min_ms: f64,
    pub runs: usize,
    pub peak_mb: f64,
    pub delta_mb: f64,
    pub threads: usize,
    #[serde(default)]
    pub extra: Map<String, Value>,
}

/// Runs `f` `warmup` times, then `runs` timed times; the memory figures cover all of them.
pub fn measure(warmup: usize, runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Measured> {
    let before = rss_mb();
    reset_peak();
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        ms.push(time_ms(&mut f)?);
    }
    let peak = peak_mb();
    Ok(Measured { timing: Timing::of(ms), peak_mb: peak, delta_mb: (peak - before).max(0.0), extra: Map::new() })
}

/// Times `base` and `other` alternately (so both see the same machine load) and returns the
/// measurement of `other` with `base_ms` and `overhead` (other / base - 1) in its extras. The
/// memory figures cover both.
pub fn measure_against(
    warmup: usize,
    runs: usize,
    mut base: impl FnMut() -> anyhow::Result<()>,
    mut other: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Measured> {
    let before = rss_mb();
    reset_peak();
    for _ in 0..warmup {
        base()?;
        other()?;
    }
    let (mut b, mut o) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for i in 0..runs {
        // Alternate which goes first, so neither always runs on a warm cache.
        if i % 2 == 0 {
            b.push(time_ms(&mut base)?);
            o.push(time_ms(&mut other)?);
        } else {
            o.push(time_ms(&mut other)?);
            b.push(time_ms(&mut base)?);
        }
    }
    let peak = peak_mb();
    let (tb, to) = (Timing::of(b), Timing::of(o));
    let m = Measured { timing: to, peak_mb: peak, delta_mb: (peak - before).max(0.0), extra: Map::new() };
    Ok(m.with("base_ms", tb.median_ms).with("overhead", to.median_ms / tb.median_ms - 1.0))
}

/// [`measure`] on `device`. On a GPU each run waits for the GPU to finish, and the memory figures
/// are the card's used memory (as nvidia-smi shows it, the CUDA context included), sampled every
/// millisecond by a second thread; the reference script measures torch the same way.
pub fn measure_on(device: &Device, warmup: usize, runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Measured> {
    if device.is_cpu() {
        return measure(warmup, runs, f);
    }
    let memory = GpuMemory::start(device)?;
    let before = memory.used_mb();
    let mut f = || -> anyhow::Result<()> {
        f()?;
        Ok(device.synchronize()?)
    };
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        ms.push(time_ms(&mut f)?);
    }
    let peak = memory.stop();
    Ok(Measured { timing: Timing::of(ms), peak_mb: peak, delta_mb: (peak - before).max(0.0), extra: Map::new() }
        .with("memory", "GPU used memory, sampled every ms"))
}

#[cfg(feature = "cuda")]
struct GpuMemory {
    context: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

#[cfg(feature = "cuda")]
impl GpuMemory {
    fn start(device: &Device) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let context = device.as_cuda_device()?.cuda_stream().context().clone();
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (context, peak, stop) = (context.clone(), peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((free, total)) = context.mem_get_info() {
                        peak.fetch_max((total - free) as u64, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        };
        Ok(Self { context, peak, stop, thread })
    }

    fn used_mb(&self) -> f64 {
        self.context.mem_get_info().map_or(0.0, |(free, total)| (total - free) as f64 / 1048576.0)
    }

    /// The peak used memory since `start`, in MB.
    fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1048576.0
    }
}

#[cfg(not(feature = "cuda"))]
struct GpuMemory;

#[cfg(not(feature = "cuda"))]
impl GpuMemory {
    fn start(device: &Device) -> anyhow::Result<Self> {
        anyhow::bail!("no GPU memory figures for {device:?} in this build")
    }

    fn used_mb(&self) -> f64 {
        0.0
    }

    fn stop(self) -> f64 {
        0.0
    }
}

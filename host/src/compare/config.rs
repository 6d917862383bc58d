//! `graft compare --config compare.toml`: what a comparison is made of.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use graft_trainer::config::{DatasetSection, StrategySection, TrainConfig};
use graft_trainer::options::{parse_toml, TrainOptions};
use graft_trainer::samples::{parse_prompt_file, parse_prompts, SampleDefaults, SamplePrompt};

/// An example config, shown by `graft compare --help`.
pub const EXAMPLE: &str = r#"model = "models/sd_xl_base_1.0.safetensors"       # diffusers folder or single file
output_dir = "out/compare"                        # the report folder
seed = 42                                         # data order, noise, timesteps, sample seeds
# seeds = [1, 2, 3]                               # or: every strategy once per seed, mean ± std
steps = 500                                       # the same budget for every strategy
loss_window = 50                                  # the table's mean loss is over the last N steps
lr_schedule = "constant"
# every other option of `graft train --help` (batch_size, optimizer and [optimizer_args],
# save_every, sample_every, gradient_checkpointing, ...) means the same here, for every strategy
sample_prompts = "prompts.txt"                    # kohya prompt file (`a cat --w 1024 --h 1024 --s 30`)
# prompts = ["a pink star, line art --s 20"]      # or the lines inline

[dataset]                                         # as in `graft train --help`
dir = "data/my-style"
resolution = 1024

[[strategies]]
name = "lora-r8"                                  # row name and folder name (default: the plugin id)
plugin = "lora"
config = { rank = 8, alpha = 8 }

[[strategies]]
name = "lora-r32"                                 # a config variant of the same plugin
plugin = "lora"
config = { rank = 32, alpha = 16 }

[[strategies]]
plugin = "attention-gate"

[[strategies]]
plugin = "progressive-fusion"
config = { stage1_steps = 250, stage2_steps = 250 }
"#;

/// One row of the comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyEntry {
    /// Row and folder name; default: the plugin id.
    #[serde(default)]
    pub name: Option<String>,
    pub plugin: String,
    #[serde(default)]
    pub config: toml::Table,
}

impl StrategyEntry {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.plugin)
    }

    /// The plugin's config as JSON (for the report).
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_default()
    }
}

/// A `graft compare` config: the model, the report folder, the [`TrainOptions`] every
/// strategy trains with (at the top level of the file), the prompts, the dataset and the rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareConfig {
    pub model: PathBuf,
    #[serde(default)]
    pub model_config: Option<PathBuf>,
    pub output_dir: PathBuf,
    #[serde(default = "ten")]
    pub loss_window: u64,
    /// Train every strategy once per seed (instead of `seed`); the table shows mean ± std.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Vec<u64>>,
    #[serde(flatten)]
    pub options: TrainOptions,
    #[serde(default)]
    pub sample_prompts: Option<PathBuf>,
    #[serde(default)]
    pub prompts: Vec<String>,
    pub dataset: DatasetSection,
    #[serde(default)]
    pub strategies: Vec<StrategyEntry>,
}

/// The top-level keys of a compare config besides the options.
const OWN_KEYS: [&str; 9] =
    ["model", "model_config", "output_dir", "loss_window", "seeds", "sample_prompts", "prompts", "dataset", "strategies"];

fn ten() -> u64 {
    10
}

/// A row name: a file and folder name, and not `base`.
fn check_name(name: &str) -> anyhow::Result<()> {
    graft_trainer::names::check_name("strategy name", name)?;
    if name == "base" {
        bail!("strategy name `base` is taken by the base model's row: choose another");
    }
    Ok(())
}

impl CompareConfig {
    /// Parses a config; relative paths in it are relative to `base`. `source` names it in errors.
    pub fn parse_str(text: &str, source: &str, base: &Path) -> anyhow::Result<Self> {
        let what = || format!("{source}: invalid compare config (`graft compare --help` shows an example)");
        // `seed` has a default, so only the file tells whether it was given beside `seeds`.
        if let Ok(table) = toml::from_str::<toml::Table>(text) {
            if table.contains_key("seed") && table.contains_key("seeds") {
                bail!("{source}: both `seed` and `seeds` are set: keep one (`seeds = [..]` trains every strategy once per seed)");
            }
        }
        let mut config: CompareConfig = parse_toml(text, &OWN_KEYS).with_context(what)?;
        config.resolve_paths(base);
        config.validate().with_context(|| source.to_string())?;
        Ok(config)
    }

    /// Reads a config file; relative paths in it are relative to the file's folder.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read compare config {}", path.display()))?;
        Self::parse_str(&text, &path.display().to_string(), path.parent().unwrap_or(Path::new(".")))
    }

    fn resolve_paths(&mut self, base: &Path) {
        // `output_dir = "."` is the config's folder itself, not `folder/.`.
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                let clean: PathBuf = base.join(&*p).components().filter(|c| *c != std::path::Component::CurDir).collect();
                *p = if clean.as_os_str().is_empty() { PathBuf::from(".") } else { clean };
            }
        };
        fix(&mut self.model);
        fix(&mut self.output_dir);
        self.model_config.as_mut().map(fix);
        self.sample_prompts.as_mut().map(fix);
        self.dataset.dir.as_mut().map(fix);
        self.options.validation_dir.as_mut().map(fix);
        self.dataset.config.as_mut().map(fix);
    }

    /// Checks what the run needs before the model is loaded. Each strategy's plugin config is
    /// checked by its plugin when the strategy starts (a bad one fails that row only).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.strategies.is_empty() {
            bail!("no strategy: add at least one `[[strategies]]` table with `plugin = \"...\"`");
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.strategies.iter().enumerate() {
            check_name(s.name()).with_context(|| format!("[[strategies]] number {}", i + 1))?;
            if !seen.insert(s.name()) {
                bail!("two strategies are named `{}`: give each `[[strategies]]` its own `name`", s.name());
            }
        }
        if self.sample_prompts.is_some() && !self.prompts.is_empty() {
            bail!("both `sample_prompts` (a file) and `prompts` (inline) are set: keep one");
        }
        if self.loss_window == 0 {
            bail!("`loss_window` must be at least 1");
        }
        if let Some(seeds) = &self.seeds {
            if seeds.is_empty() {
                bail!("`seeds` is empty: give at least one seed, or remove `seeds` and set `seed`");
            }
            if self.options.seed != 0 {
                bail!("both `seed` and `seeds` are set: keep one (`seeds = [..]` trains every strategy once per seed)");
            }
            let mut unique = std::collections::BTreeSet::new();
            if let Some(s) = seeds.iter().find(|s| !unique.insert(**s)) {
                bail!("`seeds` lists seed {s} twice: each seed is one run of every strategy");
            }
        }
        // Everything a training run checks, on the first strategy.
        Ok(self.train_config(&self.strategies[0], &self.output_dir)?.validate()?)
    }

    /// The training run of one strategy, writing into `out_dir` with files named after the
    /// row. Every option means what it means in `graft train`; the prompts are also rendered
    /// once for every row at the end, for the report.
    pub fn train_config(&self, s: &StrategyEntry, out_dir: &Path) -> anyhow::Result<TrainConfig> {
        self.train_config_seeded(s, out_dir, None)
    }

    /// [`Self::train_config`] with `options.seed` set to `seed` (one run of `seeds`).
    pub fn train_config_seeded(&self, s: &StrategyEntry, out_dir: &Path, seed: Option<u64>) -> anyhow::Result<TrainConfig> {
        let mut options = self.options.clone();
        if let Some(seed) = seed {
            options.seed = seed;
        }
        Ok(TrainConfig {
            model: self.model.clone(),
            model_config: self.model_config.clone(),
            output_dir: out_dir.to_path_buf(),
            output_name: s.name().to_string(),
            options,
            sample_prompts: self.sample_prompts.clone(),
            export_checkpoint: false,
            // One model is loaded for every strategy, and put back between them.
            shared_model: true,
            dataset: self.dataset.clone(),
            // Parameters are keyed by the plugin id, not the row name: parameter inits derive from
            // the seed and the key, so config variants of one plugin start from the same values.
            strategy: StrategySection { plugin: s.plugin.clone(), name: None, config: s.config.clone() },
        })
    }

    /// The seeds of the runs of every strategy: `seeds`, or `[seed]` when it is not set.
    pub fn run_seeds(&self) -> Vec<u64> {
        self.seeds.clone().unwrap_or_else(|| vec![self.options.seed])
    }

    /// The seed of the base model's samples and of the prompts: `seed`, or the first of `seeds`.
    pub fn first_seed(&self) -> u64 {
        self.seeds.as_ref().and_then(|s| s.first().copied()).unwrap_or(self.options.seed)
    }

    /// The sample prompts (none when neither `sample_prompts` nor `prompts` is set). A line
    /// without `--d` gets `seed + its index` (the first of `seeds`), so every row and every
    /// seed's run draws the same noise per column.
    pub fn prompts(&self) -> anyhow::Result<Vec<SamplePrompt>> {
        let defaults =
            SampleDefaults { width: self.dataset.resolution, height: self.dataset.resolution, seed: self.first_seed(), ..Default::default() };
        match &self.sample_prompts {
            Some(p) => Ok(parse_prompt_file(p, &defaults)?),
            None => Ok(parse_prompts(&self.prompts.join("\n"), "compare config `prompts`", &defaults)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<CompareConfig> {
        CompareConfig::parse_str(text, "c.toml", Path::new("/base"))
    }

    const MIN: &str = "model = \"m\"\noutput_dir = \"out\"\nsteps = 3\nprompts = [\"a cat --s 2 --w 64 --h 64\"]\n\
                       [dataset]\ndir = \"d\"\nresolution = 64\n";

    #[test]
    fn example_parses() {
        let c = CompareConfig::parse_str(EXAMPLE, "example", Path::new("/x")).unwrap();
        assert_eq!(c.strategies.len(), 4);
        assert_eq!(c.strategies[2].name(), "attention-gate");
        assert_eq!(c.model, Path::new("/x/models/sd_xl_base_1.0.safetensors"));
        let dot = parse(&format!("{}[[strategies]]\nplugin = \"lora\"\n", MIN.replace("\"out\"", "\".\""))).unwrap();
        assert_eq!(dot.output_dir, Path::new("/base"));
        let t = c.train_config(&c.strategies[1], Path::new("/r/lora-r32")).unwrap();
        assert_eq!((t.output_name.as_str(), t.strategy.plugin.as_str(), t.options.steps), ("lora-r32", "lora", 500));
        assert_eq!(t.strategy_json().unwrap(), r#"{"alpha":16,"rank":32}"#);
    }

    #[test]
    fn strategies_and_prompts() {
        let c = parse(&format!(
            "{MIN}[[strategies]]\nplugin = \"lora\"\n[[strategies]]\nname = \"v2\"\nplugin = \"lora\"\nconfig = {{ rank = 2 }}\n"
        ))
        .unwrap();
        assert_eq!(c.strategies[0].name(), "lora");
        assert_eq!(c.strategies[1].config_json(), r#"{"rank":2}"#);
        assert_eq!(c.loss_window, 10);
        assert_eq!(c.dataset.dir.as_deref(), Some(Path::new("/base/d")));
        let p = c.prompts().unwrap();
        assert_eq!((p.len(), p[0].width, p[0].steps, p[0].seed), (1, 64, 2, 0));
    }

    #[test]
    fn errors_say_what_to_do() {
        let err = |t: &str| format!("{:#}", parse(t).unwrap_err());
        assert!(err(MIN).contains("no strategy"));
        let e = err(&format!("{MIN}[[strategies]]\nplugin = \"lora\"\n[[strategies]]\nplugin = \"lora\"\n"));
        assert!(e.contains("two strategies are named `lora`"), "{e}");
        let e = err(&format!("{MIN}[[strategies]]\nname = \"a b\"\nplugin = \"lora\"\n"));
        assert!(e.contains("`a b`") && e.contains("letters"), "{e}");
        let e = err(&format!("{MIN}[[strategies]]\nname = \"base\"\nplugin = \"lora\"\n"));
        assert!(e.contains("base"), "{e}");
        let e = err(&format!("{MIN}bogus = 1\n[[strategies]]\nplugin = \"lora\"\n"));
        assert!(e.contains("bogus") && e.contains("graft compare --help"), "{e}");
        let e = err(&format!("{}[[strategies]]\nplugin = \"lora\"\n", MIN.replace("steps = 3", "steps = 0")));
        assert!(e.contains("steps"), "{e}");
    }

    #[test]
    fn seeds() {
        let c = parse(&format!("seeds = [5, 9]\n{MIN}[[strategies]]\nplugin = \"lora\"\n")).unwrap();
        assert_eq!((c.run_seeds(), c.first_seed()), (vec![5, 9], 5));
        let t = c.train_config_seeded(&c.strategies[0], Path::new("/r"), Some(9)).unwrap();
        assert_eq!(t.options.seed, 9);
        assert_eq!(c.train_config(&c.strategies[0], Path::new("/r")).unwrap().options.seed, 0);
        // The prompts' default seeds start at the first seed.
        assert_eq!(c.prompts().unwrap()[0].seed, 5);
        let one = parse(&format!("seed = 3\n{MIN}[[strategies]]\nplugin = \"lora\"\n")).unwrap();
        assert_eq!((one.run_seeds(), one.first_seed(), one.seeds), (vec![3], 3, None));

        let err = |t: &str| format!("{:#}", parse(t).unwrap_err());
        // Even `seed = 0` (its default) beside `seeds` is refused: the file says both.
        let e = err(&format!("seed = 0\nseeds = [1, 2]\n{MIN}[[strategies]]\nplugin = \"lora\"\n"));
        assert!(e.contains("`seed`") && e.contains("`seeds`") && e.contains("c.toml"), "{e}");
        let e = err(&format!("seeds = []\n{MIN}[[strategies]]\nplugin = \"lora\"\n"));
        assert!(e.contains("`seeds` is empty"), "{e}");
        let e = err(&format!("seeds = [1, 2, 1]\n{MIN}[[strategies]]\nplugin = \"lora\"\n"));
        assert!(e.contains("seed 1 twice"), "{e}");
        // A config built in code: `seed` other than its default beside `seeds`.
        let mut c = c;
        c.options.seed = 4;
        let e = format!("{:#}", c.validate().unwrap_err());
        assert!(e.contains("`seed`") && e.contains("`seeds`"), "{e}");
    }
}

//! Finding the adapter a prompt names in `--lora-dir` folders.
//!
//! Every `*.safetensors` file under the folders (subfolders too, hidden ones skipped) is a
//! candidate. A name matches, in this order of preference:
//! 1. the file stem (`<lora:pixel_art:1>` finds `pixel_art.safetensors`), or the path relative to
//!    its folder without the extension (`<lora:styles/pixel_art:1>`);
//! 2. the `ss_output_name` in the file's header (what kohya names the training run; A1111 can
//!    show LoRAs by it);
//! 3. the file stem ignoring case.
//!
//! Folders are searched in the order given; the first folder with a match wins. Two matches of
//! the same kind in one folder are an error that lists both (name one by its relative path).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// One candidate file.
#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    /// Which `--lora-dir` it is in.
    dir: usize,
    stem: String,
    /// Relative to its folder, `/`-separated, without `.safetensors`.
    rel: String,
}

/// A way to match a name: its description and the test.
type Rule<'a> = (&'a str, &'a dyn Fn(&Entry) -> bool);

/// The adapter files of the `--lora-dir` folders.
#[derive(Debug, Clone, Default)]
pub struct LoraDirs {
    dirs: Vec<PathBuf>,
    entries: Vec<Entry>,
}

impl LoraDirs {
    /// Lists the folders (each must exist).
    pub fn scan(dirs: &[PathBuf]) -> anyhow::Result<Self> {
        let mut entries = Vec::new();
        for (d, dir) in dirs.iter().enumerate() {
            if !dir.is_dir() {
                bail!("--lora-dir {}: not a folder", dir.display());
            }
            let mut found = Vec::new();
            walk(dir, &mut found).with_context(|| format!("--lora-dir {}", dir.display()))?;
            found.sort();
            for path in found {
                let rel = path.strip_prefix(dir).unwrap_or(&path).with_extension("");
                let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                entries.push(Entry { path, dir: d, stem, rel });
            }
        }
        Ok(Self { dirs: dirs.to_vec(), entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The file a prompt's adapter name stands for.
    pub fn resolve(&self, name: &str) -> anyhow::Result<PathBuf> {
        if self.dirs.is_empty() {
            bail!("the prompt names adapter `{name}` (`<lora:{name}:...>`), but no --lora-dir folder was given to find it in");
        }
        let by_output_name =
            |e: &Entry| read_header_metadata(&e.path).ok().and_then(|m| m.get("ss_output_name").cloned()).is_some_and(|n| n == name);
        let rules: [Rule; 3] = [
            ("file name", &|e: &Entry| e.stem == name || e.rel == name),
            ("ss_output_name", &by_output_name),
            ("file name (ignoring case)", &|e: &Entry| e.stem.eq_ignore_ascii_case(name)),
        ];
        for d in 0..self.dirs.len() {
            for (what, rule) in rules {
                let hits: Vec<&Entry> = self.entries.iter().filter(|e| e.dir == d && rule(e)).collect();
                match hits.as_slice() {
                    [] => continue,
                    [one] => return Ok(one.path.clone()),
                    many => {
                        let list: Vec<String> = many.iter().map(|e| format!("{} (`<lora:{}:...>`)", e.path.display(), e.rel)).collect();
                        bail!(
                            "adapter name `{name}` is ambiguous: several files in {} match by {what}:\n  {}\nname one by its path relative to the folder",
                            self.dirs[d].display(),
                            list.join("\n  ")
                        );
                    }
                }
            }
        }
        let folders: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        let lower = name.to_lowercase();
        let mut near: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| {
                let s = e.stem.to_lowercase();
                s.contains(&lower) || lower.contains(&s)
            })
            .map(|e| e.rel.as_str())
            .collect();
        near.dedup();
        let mut msg = format!(
            "no adapter named `{name}` in {} ({} .safetensors files; names are file stems or the files' ss_output_name)",
            folders.join(", "),
            self.entries.len()
        );
        if !near.is_empty() {
            msg.push_str(&format!("; similar: {}", near.iter().take(5).copied().collect::<Vec<_>>().join(", ")));
        }
        bail!(msg)
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
            out.push(path);
        }
    }
    Ok(())
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTensor {
    /// `F16`, `BF16`, `F32`, ...
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// A safetensors header: metadata and tensor entries, read without the tensor data.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, HeaderTensor>,
    /// Bytes of the whole file.
    pub file_size: u64,
}

/// Reads the header of a safetensors file (not its data).
pub fn read_header(path: &Path) -> anyhow::Result<Header> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let file_size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("{}: not a safetensors file (too short)", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || n + 8 > file_size {
        bail!("{}: not a safetensors file (header length {n} for a file of {file_size} bytes)", path.display());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).with_context(|| format!("{}: the safetensors header is not JSON", path.display()))?;
    let Some(map) = json.as_object() else { bail!("{}: the safetensors header is not a JSON object", path.display()) };
    let mut out = Header { file_size, ..Default::default() };
    for (k, v) in map {
        if k == "__metadata__" {
            for (mk, mv) in v.as_object().into_iter().flatten() {
                out.metadata.insert(mk.clone(), mv.as_str().map(str::to_string).unwrap_or_else(|| mv.to_string()));
            }
            continue;
        }
        let dtype = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("?").to_string();
        let shape = v
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect())
            .unwrap_or_default();
        out.tensors.insert(k.clone(), HeaderTensor { dtype, shape });
    }
    Ok(out)
}

/// The `__metadata__` of a safetensors header, reading only the header.
pub fn read_header_metadata(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(read_header(path)?.metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, output_name: Option<&str>) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let meta = match output_name {
            Some(n) => format!(r#""__metadata__":{{"ss_output_name":"{n}"}}"#),
            None => String::new(),
        };
        let mut header = format!("{{{meta}}}").into_bytes();
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn resolves_by_stem_path_output_name_and_case() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        write(&a.join("pixel_art.safetensors"), Some("pixel-v2"));
        write(&a.join("styles/ink.safetensors"), None);
        write(&a.join("styles/more/Ink2.safetensors"), Some("inky"));
        write(&b.join("pixel_art.safetensors"), None);
        write(&b.join("only_b.safetensors"), None);
        write(&a.join(".hidden/secret.safetensors"), None);
        let dirs = LoraDirs::scan(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(dirs.len(), 5);
        assert_eq!(dirs.resolve("pixel_art").unwrap(), a.join("pixel_art.safetensors"), "the first folder wins");
        assert_eq!(dirs.resolve("only_b").unwrap(), b.join("only_b.safetensors"));
        assert_eq!(dirs.resolve("styles/ink").unwrap(), a.join("styles/ink.safetensors"));
        assert_eq!(dirs.resolve("pixel-v2").unwrap(), a.join("pixel_art.safetensors"));
        assert_eq!(dirs.resolve("inky").unwrap(), a.join("styles/more/Ink2.safetensors"));
        assert_eq!(dirs.resolve("ink2").unwrap(), a.join("styles/more/Ink2.safetensors"));
        let e = format!("{:#}", dirs.resolve("pixel").unwrap_err());
        assert!(e.contains("no adapter named `pixel`") && e.contains("similar: pixel_art"), "{e}");
        assert!(format!("{:#}", dirs.resolve("secret").unwrap_err()).contains("no adapter"));

        write(&a.join("other/ink.safetensors"), None);
        let dirs = LoraDirs::scan(std::slice::from_ref(&a)).unwrap();
        let e = format!("{:#}", dirs.resolve("ink").unwrap_err());
        assert!(e.contains("ambiguous") && e.contains("other/ink") && e.contains("styles/ink"), "{e}");

        let e = format!("{:#}", LoraDirs::default().resolve("x").unwrap_err());
        assert!(e.contains("--lora-dir"), "{e}");
        assert!(LoraDirs::scan(&[t.path().join("nope")]).is_err());
    }
}

//! Adapters named in prompts and on the command line.
//!
//! - A1111's extra-network tags: `<lora:name>` (weight 1), `<lora:name:w>` (w on the text
//!   encoders and the UNet), `<lora:name:te_w:unet_w>`, and the named forms `te=` / `unet=`
//!   (`<lora:name:0.8:unet=0.5>`). `<lyco:...>` (the LyCORIS extension's tag) means the same.
//!   Tags are removed from the prompt text before it is encoded, exactly as A1111 removes them
//!   (the text around them is left as it is). Any other `<kind:...>` tag (`<hypernet:...>`) is an
//!   error: graft has no such network, and ignoring it would silently change the image.
//! - `--adapter FILE[:w[:unet_w]]`: a file path with optional weights after the last colons.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// One adapter a prompt asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterTag {
    pub name: String,
    pub te_weight: f64,
    pub unet_weight: f64,
}

/// Extra-network kinds graft applies as adapter files.
const ADAPTER_KINDS: [&str; 2] = ["lora", "lyco"];

/// Splits a prompt into its text without the adapter tags, and the tags in order.
pub fn extract_adapter_tags(prompt: &str) -> anyhow::Result<(String, Vec<AdapterTag>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        match tag_at(after) {
            Some((kind, body, len)) => {
                text.push_str(&rest[..start]);
                if !ADAPTER_KINDS.contains(&kind) {
                    bail!(
                        "prompt tag `<{kind}:{body}>`: graft applies `<lora:name:weight>` (and `<lyco:...>`) \
                         tags only; remove the tag or use a LoRA"
                    );
                }
                tags.push(parse_tag(body).with_context(|| format!("prompt tag `<{kind}:{body}>`"))?);
                rest = &after[len + 1..];
            }
            None => {
                text.push_str(&rest[..start + 1]);
                rest = after;
            }
        }
    }
    text.push_str(rest);
    Ok((text, tags))
}

/// `kind:body>` at the start of `s` (A1111's `<(\w+):([^>]+)>`): (kind, body, length up to the `>`).
fn tag_at(s: &str) -> Option<(&str, &str, usize)> {
    let colon = s.find(':')?;
    let kind = &s[..colon];
    if kind.is_empty() || !kind.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let close = s[colon + 1..].find('>')? + colon + 1;
    let body = &s[colon + 1..close];
    if body.is_empty() {
        return None;
    }
    Some((kind, body, close))
}

fn number(s: &str, what: &str) -> anyhow::Result<f64> {
    let v: f64 = s.trim().parse().map_err(|_| anyhow::anyhow!("the {what} `{s}` is not a number"))?;
    if !v.is_finite() {
        bail!("the {what} `{s}` is not a finite number");
    }
    Ok(v)
}

/// `name[:te_w[:unet_w]]` with `te=` / `unet=` named weights.
fn parse_tag(body: &str) -> anyhow::Result<AdapterTag> {
    let mut parts = body.split(':');
    let name = parts.next().unwrap_or_default().trim().to_string();
    if name.is_empty() {
        bail!("the adapter name is empty");
    }
    let mut positional = Vec::new();
    let (mut te, mut unet) = (None, None);
    for p in parts {
        match p.split_once('=') {
            Some((k, v)) => match k.trim() {
                "te" => te = Some(number(v, "text encoder weight")?),
                "unet" => unet = Some(number(v, "UNet weight")?),
                other => bail!("unknown setting `{other}=`; graft takes `te=` and `unet=`"),
            },
            None => positional.push(number(p, "weight")?),
        }
    }
    if positional.len() > 2 {
        bail!("too many weights: `<lora:name:w>` or `<lora:name:te_weight:unet_weight>`");
    }
    // A1111: one number sets both (the UNet weight defaults to the positional text-encoder
    // weight); the named forms override afterwards.
    let first = positional.first().copied().unwrap_or(1.0);
    let te_weight = te.unwrap_or(first);
    let unet_weight = unet.or(positional.get(1).copied()).unwrap_or(first);
    Ok(AdapterTag { name, te_weight, unet_weight })
}

/// One `--adapter` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub path: PathBuf,
    pub te_weight: f64,
    pub unet_weight: f64,
}

/// Parses `FILE`, `FILE:w` or `FILE:te_w:unet_w`. A path that exists as given is taken whole
/// (so a file name with colons works); otherwise trailing `:number` parts are weights.
pub fn parse_adapter_spec(spec: &str) -> anyhow::Result<AdapterSpec> {
    let whole = Path::new(spec);
    if spec.is_empty() {
        bail!("--adapter needs a file: --adapter FILE[:weight] or FILE:te_weight:unet_weight");
    }
    if whole.is_file() {
        return Ok(AdapterSpec { path: whole.to_path_buf(), te_weight: 1.0, unet_weight: 1.0 });
    }
    let is_num = |s: &str| s.trim().parse::<f64>().is_ok_and(|v| v.is_finite());
    let mut parts: Vec<&str> = spec.rsplitn(3, ':').collect(); // last first
    let (path, te, unet) = match parts.as_mut_slice() {
        [u, t, p] if is_num(u) && is_num(t) => (p.to_string(), number(t, "weight")?, number(u, "weight")?),
        [w, rest @ ..] if is_num(w) && !rest.is_empty() => {
            let p = rest.iter().rev().copied().collect::<Vec<_>>().join(":");
            let w = number(w, "weight")?;
            (p, w, w)
        }
        _ => (spec.to_string(), 1.0, 1.0),
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!("--adapter {spec}: no such file {} (give FILE, FILE:weight or FILE:te_weight:unet_weight)", path.display());
    }
    Ok(AdapterSpec { path, te_weight: te, unet_weight: unet })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, te: f64, unet: f64) -> AdapterTag {
        AdapterTag { name: name.into(), te_weight: te, unet_weight: unet }
    }

    #[test]
    fn tags_are_taken_out_of_the_prompt() {
        let (text, tags) = extract_adapter_tags("a fox <lora:style_a:0.8>, watercolor <lora:Detail Tweaker:0.5:1> <lyco:x>").unwrap();
        assert_eq!(text, "a fox , watercolor  ");
        assert_eq!(tags, vec![tag("style_a", 0.8, 0.8), tag("Detail Tweaker", 0.5, 1.0), tag("x", 1.0, 1.0)]);
        let (_, tags) = extract_adapter_tags("<lora:a:0.7:unet=0.2><lora:b:te=0>").unwrap();
        assert_eq!(tags, vec![tag("a", 0.7, 0.2), tag("b", 0.0, 1.0)]);
        let (_, tags) = extract_adapter_tags("<lora:a:unet=0.3>").unwrap();
        assert_eq!(tags, vec![tag("a", 1.0, 0.3)]);
    }

    #[test]
    fn text_that_is_no_tag_stays() {
        for p in ["i <3 cats", "a < b > c", "<not a tag>", "<:x>", "<lora:>", "plain"] {
            let (text, tags) = extract_adapter_tags(p).unwrap();
            assert_eq!((text.as_str(), tags.len()), (p, 0), "{p}");
        }
    }

    #[test]
    fn bad_tags_are_errors() {
        let e = |p: &str| format!("{:#}", extract_adapter_tags(p).unwrap_err());
        assert!(e("a <hypernet:x:1>").contains("hypernet"));
        assert!(e("<lora:x:much>").contains("not a number"));
        assert!(e("<lora:x:1:2:3>").contains("too many"));
        assert!(e("<lora:x:dyn=3>").contains("dyn"));
        assert!(e("<lora: :1>").contains("name is empty"));
    }

    #[test]
    fn adapter_specs() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("style.safetensors");
        std::fs::write(&f, b"x").unwrap();
        let fs = f.to_str().unwrap();
        let spec = |s: &str| parse_adapter_spec(s).unwrap();
        assert_eq!(spec(fs), AdapterSpec { path: f.clone(), te_weight: 1.0, unet_weight: 1.0 });
        assert_eq!(spec(&format!("{fs}:0.5")), AdapterSpec { path: f.clone(), te_weight: 0.5, unet_weight: 0.5 });
        assert_eq!(spec(&format!("{fs}:0:1.5")), AdapterSpec { path: f.clone(), te_weight: 0.0, unet_weight: 1.5 });
        let colon = dir.path().join("a:b.safetensors");
        std::fs::write(&colon, b"x").unwrap();
        assert_eq!(spec(colon.to_str().unwrap()).path, colon);
        assert_eq!(spec(&format!("{}:2", colon.display())).te_weight, 2.0);
        let e = format!("{:#}", parse_adapter_spec(&format!("{}/nope.safetensors:1", dir.path().display())).unwrap_err());
        assert!(e.contains("no such file") && e.contains("nope.safetensors"), "{e}");
    }
}

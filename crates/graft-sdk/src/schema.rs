//! A strategy's config schema: every key its configuration accepts, with its type, default,
//! range and one line of help. A plugin returns it from [`crate::Strategy::config_schema`]; the
//! SDK sends it to the host as JSON through the `graft.config_schema` extension. The host shows
//! it (`graft plugins check`), draws the serve UI's settings form from it, and checks a
//! configuration against it before the strategy is made ([`ConfigSchema::validate`]).
//!
//! ```ignore
//! fn config_schema() -> Option<ConfigSchema> {
//!     Some(ConfigSchema::new()
//!         .key(ConfigKey::int("rank", 8).min(1.0).help("rank of the low-rank update"))
//!         .key(ConfigKey::float("alpha", 8.0).min(0.0).help("scale = alpha / rank"))
//!         .key(ConfigKey::choice("init", &["kaiming_uniform", "normal"], "kaiming_uniform").help("how `down` starts"))
//!         .key(ConfigKey::strings("targets", &["unet.*.attn?.to_[qkv]"]).help("layer name patterns")))
//! }
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The type of a key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyType {
    /// A JSON integer.
    Int,
    /// A JSON number.
    Float,
    Bool,
    String,
    /// A string out of `choices`.
    Enum,
    /// A list of strings.
    StringList,
}

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Int => "int",
            KeyType::Float => "float",
            KeyType::Bool => "bool",
            KeyType::String => "string",
            KeyType::Enum => "enum",
            KeyType::StringList => "string_list",
        }
    }
}

/// One configuration key. Unknown fields are ignored when read, so a later SDK may add some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigKey {
    pub key: String,
    #[serde(rename = "type")]
    pub kind: KeyType,
    /// The value the strategy uses when the key is absent (`null` only for a nullable key).
    pub default: Value,
    /// Inclusive bounds for int and float keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// `min` excluded: the value must be greater than it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub min_exclusive: bool,
    /// `max` excluded: the value must be less than it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub max_exclusive: bool,
    /// The values of an enum key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// `null` is accepted too (e.g. "no clipping").
    #[serde(default, skip_serializing_if = "is_false")]
    pub nullable: bool,
    /// One line for the user.
    #[serde(default)]
    pub help: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ConfigKey {
    fn new(key: &str, kind: KeyType, default: Value) -> Self {
        Self {
            key: key.to_string(),
            kind,
            default,
            min: None,
            max: None,
            min_exclusive: false,
            max_exclusive: false,
            choices: Vec::new(),
            nullable: false,
            help: String::new(),
        }
    }
    pub fn int(key: &str, default: i64) -> Self {
        Self::new(key, KeyType::Int, Value::from(default))
    }
    pub fn float(key: &str, default: f64) -> Self {
        Self::new(key, KeyType::Float, Value::from(default))
    }
    pub fn bool(key: &str, default: bool) -> Self {
        Self::new(key, KeyType::Bool, Value::from(default))
    }
    pub fn string(key: &str, default: &str) -> Self {
        Self::new(key, KeyType::String, Value::from(default))
    }
    /// A string out of `choices`.
    pub fn choice(key: &str, choices: &[&str], default: &str) -> Self {
        let mut k = Self::new(key, KeyType::Enum, Value::from(default));
        k.choices = choices.iter().map(|c| c.to_string()).collect();
        k
    }
    /// A list of strings.
    pub fn strings<S: AsRef<str>>(key: &str, default: &[S]) -> Self {
        Self::new(key, KeyType::StringList, Value::from(default.iter().map(|s| s.as_ref().to_string()).collect::<Vec<_>>()))
    }
    /// A float that may be `null`; `default` none: `null`.
    pub fn float_or_null(key: &str, default: Option<f64>) -> Self {
        let mut k = Self::new(key, KeyType::Float, default.map_or(Value::Null, Value::from));
        k.nullable = true;
        k
    }
    /// Accept `null` too.
    pub fn nullable(mut self) -> Self {
        self.nullable = true;
        self
    }
    pub fn min(mut self, min: f64) -> Self {
        self.min = Some(min);
        self
    }
    /// The value must be greater than `min`.
    pub fn above(mut self, min: f64) -> Self {
        self.min = Some(min);
        self.min_exclusive = true;
        self
    }
    pub fn max(mut self, max: f64) -> Self {
        self.max = Some(max);
        self
    }
    /// The value must be less than `max`.
    pub fn below(mut self, max: f64) -> Self {
        self.max = Some(max);
        self.max_exclusive = true;
        self
    }
    pub fn range(self, min: f64, max: f64) -> Self {
        self.min(min).max(max)
    }
    pub fn help(mut self, text: &str) -> Self {
        self.help = text.to_string();
        self
    }

    /// Checks one value against this key; the error names the key.
    pub fn check_value(&self, value: &Value) -> Result<(), String> {
        let key = &self.key;
        let shown = || {
            let s = value.to_string();
            if s.chars().count() > 60 {
                format!("{}...", s.chars().take(57).collect::<String>())
            } else {
                s
            }
        };
        if value.is_null() {
            return if self.nullable { Ok(()) } else { Err(format!("key `{key}`: null is not allowed (expected {})", self.expected())) };
        }
        let ok = match self.kind {
            KeyType::Int => value.is_i64() || value.is_u64(),
            KeyType::Float => value.is_number(),
            KeyType::Bool => value.is_boolean(),
            KeyType::String => value.is_string(),
            KeyType::Enum => value.as_str().is_some_and(|v| self.choices.iter().any(|c| c == v)),
            KeyType::StringList => value.as_array().is_some_and(|a| a.iter().all(|v| v.is_string())),
        };
        if !ok {
            return Err(format!("key `{key}`: expected {}, got {}", self.expected(), shown()));
        }
        if let Some(x) = value.as_f64() {
            if let Some(min) = self.min {
                if x < min || (self.min_exclusive && x == min) {
                    let op = if self.min_exclusive { ">" } else { ">=" };
                    return Err(format!("key `{key}`: {} is out of range (must be {op} {min})", shown()));
                }
            }
            if let Some(max) = self.max {
                if x > max || (self.max_exclusive && x == max) {
                    let op = if self.max_exclusive { "<" } else { "<=" };
                    return Err(format!("key `{key}`: {} is out of range (must be {op} {max})", shown()));
                }
            }
        }
        Ok(())
    }

    /// What a value must be, in words.
    pub fn expected(&self) -> String {
        let base = match self.kind {
            KeyType::Int => "an integer".to_string(),
            KeyType::Float => "a number".to_string(),
            KeyType::Bool => "true or false".to_string(),
            KeyType::String => "a string".to_string(),
            KeyType::Enum => format!("one of {}", self.choices.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")),
            KeyType::StringList => "a list of strings".to_string(),
        };
        if self.nullable {
            format!("{base} or null")
        } else {
            base
        }
    }

    /// The range as text (`[0, 1)`, `> 0`, `>= 1`), empty when unbounded.
    pub fn range_text(&self) -> String {
        let open = if self.min_exclusive { "(" } else { "[" };
        let close = if self.max_exclusive { ")" } else { "]" };
        match (self.min, self.max) {
            (Some(a), Some(b)) => format!("{open}{a}, {b}{close}"),
            (Some(a), None) => format!("{} {a}", if self.min_exclusive { ">" } else { ">=" }),
            (None, Some(b)) => format!("{} {b}", if self.max_exclusive { "<" } else { "<=" }),
            (None, None) => String::new(),
        }
    }
}

/// Every key of a strategy's configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConfigSchema {
    pub keys: Vec<ConfigKey>,
}

impl ConfigSchema {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn key(mut self, key: ConfigKey) -> Self {
        self.keys.push(key);
        self
    }

    pub fn get(&self, key: &str) -> Option<&ConfigKey> {
        self.keys.iter().find(|k| k.key == key)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{\"keys\":[]}".to_string())
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("invalid config schema JSON: {e}"))
    }

    /// The configuration made of every key's default.
    pub fn defaults(&self) -> Value {
        Value::Object(self.keys.iter().map(|k| (k.key.clone(), k.default.clone())).collect::<Map<_, _>>())
    }

    /// Checks the schema itself: keys named and unique, ranges ordered, enum choices given,
    /// every default of its key's type and within its range.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for k in &self.keys {
            if k.key.trim().is_empty() {
                return Err("a key has an empty name".to_string());
            }
            if !seen.insert(k.key.as_str()) {
                return Err(format!("key `{}` is listed twice", k.key));
            }
            if let (Some(a), Some(b)) = (k.min, k.max) {
                if a > b || (a == b && (k.min_exclusive || k.max_exclusive)) {
                    return Err(format!("key `{}`: min {a} is greater than max {b}", k.key));
                }
            }
            if (k.min.is_some() || k.max.is_some()) && !matches!(k.kind, KeyType::Int | KeyType::Float) {
                return Err(format!("key `{}`: a range is only for int and float keys, this one is {}", k.key, k.kind.name()));
            }
            if k.kind == KeyType::Enum && k.choices.is_empty() {
                return Err(format!("key `{}`: an enum key needs its choices", k.key));
            }
            k.check_value(&k.default).map_err(|e| format!("default of {e}"))?;
        }
        Ok(())
    }

    /// Checks a configuration (a JSON object; empty text means `{}`) against the schema: every
    /// key known, every value of its key's type and within its range. The error names the key.
    pub fn validate_json(&self, config: &str) -> Result<(), String> {
        let text = if config.trim().is_empty() { "{}" } else { config };
        let value: Value = serde_json::from_str(text).map_err(|e| format!("the configuration is not valid JSON: {e}"))?;
        self.validate(&value)
    }

    pub fn validate(&self, config: &Value) -> Result<(), String> {
        let Some(object) = config.as_object() else {
            return Err(format!("the configuration must be a JSON object, not {config}"));
        };
        for (key, value) in object {
            match self.get(key) {
                Some(k) => k.check_value(value)?,
                None => {
                    // Worded as serde words it, so the message reads the same whether the host or
                    // the plugin's parser catches the key.
                    let known: Vec<String> = self.keys.iter().map(|k| format!("`{}`", k.key)).collect();
                    return Err(format!("unknown field `{key}`, expected one of {}", known.join(", ")));
                }
            }
        }
        Ok(())
    }
}

/// The keys a serde parser with `deny_unknown_fields` lists in its error for an unknown key
/// ("unknown field `x`, expected one of `a`, `b`" or "expected `a`"); none when `message` is
/// not such an error. Used to check that a schema lists exactly the keys a parser accepts.
pub fn expected_fields(message: &str) -> Option<Vec<String>> {
    let at = message.find("unknown field `")?;
    let rest = &message[at..];
    let expected = &rest[rest.find(", expected ")? + ", expected ".len()..];
    if expected.starts_with("no fields") {
        return Some(Vec::new());
    }
    let expected = expected.strip_prefix("one of ").unwrap_or(expected);
    let mut fields = Vec::new();
    let mut parts = expected.split('`');
    parts.next(); // before the first backtick
    while let (Some(name), Some(sep)) = (parts.next(), parts.next()) {
        fields.push(name.to_string());
        // `a`, `b` ... the list ends where a separator is not ", " / ", or " (e.g. " at line").
        if !(sep == ", " || sep == " or " || sep == ", or ") {
            break;
        }
    }
    Some(fields)
}

/// A key name no configuration uses, to probe whether a parser refuses unknown keys.
pub const PROBE_KEY: &str = "__graft_schema_probe__";

/// Compares `schema` with the parser behind `parse` (a strategy's `new`): the defaults object
/// must parse, and an unknown key must be refused with serde's list of the accepted keys, which
/// must equal the schema's keys. Returns a short summary, or what is wrong.
pub fn check_against_parser(schema: &ConfigSchema, parse: impl Fn(&str) -> Result<(), String>) -> Result<String, String> {
    schema.check()?;
    let defaults = schema.defaults().to_string();
    parse(&defaults).map_err(|e| format!("the strategy refuses the schema's defaults {defaults}: {e}"))?;
    let probe = format!("{{\"{PROBE_KEY}\": 0}}");
    let message = match parse(&probe) {
        Ok(()) => {
            return Ok(format!(
                "{} keys; defaults accepted (the parser ignores unknown keys, so the key set is not compared)",
                schema.keys.len()
            ))
        }
        Err(e) => e,
    };
    let Some(mut accepted) = expected_fields(&message) else {
        return Ok(format!(
            "{} keys; defaults accepted (the parser's error does not list its keys, so the key set is not compared)",
            schema.keys.len()
        ));
    };
    accepted.sort();
    let mut listed: Vec<String> = schema.keys.iter().map(|k| k.key.clone()).collect();
    listed.sort();
    let missing: Vec<&String> = accepted.iter().filter(|k| !listed.contains(k)).collect();
    let extra: Vec<&String> = listed.iter().filter(|k| !accepted.contains(k)).collect();
    if !missing.is_empty() || !extra.is_empty() {
        let names = |v: &[&String]| v.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("the parser accepts {} that the schema does not list", names(&missing)));
        }
        if !extra.is_empty() {
            parts.push(format!("the schema lists {} that the parser does not accept", names(&extra)));
        }
        return Err(parts.join("; "));
    }
    Ok(format!("{} keys, the same as the parser's; defaults within range and accepted", schema.keys.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> ConfigSchema {
        ConfigSchema::new()
            .key(ConfigKey::int("rank", 8).range(1.0, 1024.0).help("rank"))
            .key(ConfigKey::float("alpha", 8.0).above(0.0))
            .key(ConfigKey::bool("rslora", false))
            .key(ConfigKey::choice("init", &["kaiming_uniform", "normal"], "normal"))
            .key(ConfigKey::strings("targets", &["unet.*"]))
            .key(ConfigKey::float_or_null("clip_norm", None).min(0.0))
            .key(ConfigKey::string("note", ""))
    }

    #[test]
    fn json_round_trip_and_format() {
        let s = schema();
        let json = s.to_json();
        assert_eq!(ConfigSchema::from_json(&json).unwrap(), s);
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["keys"][0], serde_json::json!({"key": "rank", "type": "int", "default": 8, "min": 1.0, "max": 1024.0, "help": "rank"}));
        assert_eq!(v["keys"][1]["min_exclusive"], true);
        assert_eq!(v["keys"][4]["type"], "string_list");
        assert_eq!(v["keys"][5]["nullable"], true);
        // A field from a later SDK is ignored.
        let later = r#"{"keys": [{"key": "x", "type": "int", "default": 1, "widget": "slider"}]}"#;
        assert_eq!(ConfigSchema::from_json(later).unwrap().keys[0].key, "x");
    }

    #[test]
    fn check_finds_bad_defaults() {
        assert_eq!(schema().check(), Ok(()));
        let e = ConfigSchema::new().key(ConfigKey::int("rank", 0).min(1.0)).check().unwrap_err();
        assert!(e.contains("key `rank`") && e.contains("out of range"), "{e}");
        let e = ConfigSchema::new().key(ConfigKey::choice("init", &["a"], "b")).check().unwrap_err();
        assert!(e.contains("key `init`"), "{e}");
        let mut k = ConfigKey::int("rank", 4);
        k.default = Value::from(4.5);
        assert!(ConfigSchema::new().key(k).check().unwrap_err().contains("expected an integer"));
        let e = ConfigSchema::new().key(ConfigKey::int("a", 1)).key(ConfigKey::int("a", 2)).check().unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        let s = schema();
        assert_eq!(s.validate_json(""), Ok(()));
        assert_eq!(s.validate_json(r#"{"rank": 4, "alpha": 0.5, "clip_norm": null, "targets": ["a"]}"#), Ok(()));
        let e = s.validate_json(r#"{"rank": 0}"#).unwrap_err();
        assert_eq!(e, "key `rank`: 0 is out of range (must be >= 1)");
        assert!(s.validate_json(r#"{"rank": 2.5}"#).unwrap_err().starts_with("key `rank`: expected an integer"));
        assert_eq!(s.validate_json(r#"{"alpha": 0}"#).unwrap_err(), "key `alpha`: 0 is out of range (must be > 0)");
        let p = ConfigSchema::new().key(ConfigKey::float("p", 0.0).min(0.0).below(1.0));
        assert_eq!(p.validate_json(r#"{"p": 1.0}"#).unwrap_err(), "key `p`: 1.0 is out of range (must be < 1)");
        assert_eq!(p.keys[0].range_text(), "[0, 1)");
        assert!(s.validate_json(r#"{"init": "xavier"}"#).unwrap_err().contains("key `init`: expected one of \"kaiming_uniform\", \"normal\""));
        assert!(s.validate_json(r#"{"targets": [1]}"#).unwrap_err().starts_with("key `targets`"));
        assert!(s.validate_json(r#"{"rank": null}"#).unwrap_err().starts_with("key `rank`: null"));
        let e = s.validate_json(r#"{"rnak": 4}"#).unwrap_err();
        assert!(e.starts_with("unknown field `rnak`, expected one of `rank`, `alpha`"), "{e}");
    }

    #[test]
    fn expected_fields_reads_serde_errors() {
        let e = "invalid configuration for strategy `lora`: unknown field `x`, expected one of `targets`, `rank`, `alpha` at line 1 column 4";
        assert_eq!(expected_fields(e).unwrap(), vec!["targets", "rank", "alpha"]);
        assert_eq!(expected_fields("unknown field `x`, expected `rank` at line 1").unwrap(), vec!["rank"]);
        assert_eq!(expected_fields("unknown field `x`, expected `a` or `b` at line 1").unwrap(), vec!["a", "b"]);
        assert_eq!(expected_fields("missing field `fault`"), None);
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    #[allow(dead_code)]
    struct Parsed {
        rank: usize,
        alpha: f64,
    }
    impl Default for Parsed {
        fn default() -> Self {
            Self { rank: 8, alpha: 8.0 }
        }
    }

    #[test]
    fn parser_comparison() {
        let parse = |j: &str| crate::config::parse::<Parsed>("t", j).map(|_| ()).map_err(|e| e.to_string());
        let good = ConfigSchema::new().key(ConfigKey::int("rank", 8)).key(ConfigKey::float("alpha", 8.0));
        assert!(check_against_parser(&good, parse).is_ok());
        let short = ConfigSchema::new().key(ConfigKey::int("rank", 8));
        let e = check_against_parser(&short, parse).unwrap_err();
        assert!(e.contains("the parser accepts `alpha`"), "{e}");
        let long = good.clone().key(ConfigKey::bool("extra", false));
        let e = check_against_parser(&long, parse).unwrap_err();
        assert!(e.contains("refuses the schema's defaults"), "{e}");
    }
}

//! The Hugging Face `config.json` as the registry sees it: untyped JSON with
//! helpers for the keys detection needs, and a normalising step that lets one
//! typed config read checkpoints written by transformers 4.x and 5.x alike
//! (5.x moved `rope_theta` and `rope_scaling` into `rope_parameters`).

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct HfConfig {
    path: Option<PathBuf>,
    value: Map<String, Value>,
}

impl HfConfig {
    /// Reads `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_value(value).map_err(|e| match e {
            Error::Config { key, message, .. } => Error::Config {
                file: path.display().to_string(),
                key,
                message,
            },
            other => other,
        })?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Wraps an in-memory JSON value, which must be an object.
    pub fn from_value(value: Value) -> Result<Self> {
        match value {
            Value::Object(value) => Ok(Self { path: None, value }),
            other => Err(Error::config(
                "<root>",
                format!("expected a JSON object, found {}", json_kind(&other)),
            )),
        }
    }

    /// The file this config was read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The raw JSON object.
    pub fn raw(&self) -> &Map<String, Value> {
        &self.value
    }

    /// `model_type`, if present and a string.
    pub fn model_type(&self) -> Option<&str> {
        self.value.get("model_type").and_then(Value::as_str)
    }

    /// The class names in `architectures` (empty when absent).
    pub fn architectures(&self) -> Vec<&str> {
        self.value
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }

    /// The config in the shape family configs deserialize: transformers 5.x
    /// `rope_parameters` become top-level `rope_theta` and `rope_scaling`
    /// (null for the default rope), and a `rope_scaling` written with the old
    /// `type` key also gets `rope_type`.
    pub fn normalized(&self) -> Value {
        let mut value = self.value.clone();
        if let Some(Value::Object(params)) = value.get("rope_parameters").cloned() {
            // Keys transformers 5.x moved into `rope_parameters` that are not
            // about the scaling itself go back to the top level.
            for key in ["rope_theta", "partial_rotary_factor"] {
                if let Some(v) = params.get(key) {
                    value.entry(key.to_owned()).or_insert_with(|| v.clone());
                }
            }
            let mut scaling = params.clone();
            scaling.remove("rope_theta");
            scaling.remove("partial_rotary_factor");
            let is_default = matches!(
                scaling.get("rope_type").and_then(Value::as_str),
                None | Some("default")
            ) && !scaling.contains_key("type");
            let existing = value.get("rope_scaling").is_some_and(|v| !v.is_null());
            if !existing {
                let scaling = if is_default {
                    Value::Null
                } else {
                    Value::Object(scaling)
                };
                value.insert("rope_scaling".to_owned(), scaling);
            }
        }
        if let Some(Value::Object(scaling)) = value.get_mut("rope_scaling") {
            if !scaling.contains_key("rope_type") {
                if let Some(kind) = scaling.get("type").cloned() {
                    scaling.insert("rope_type".to_owned(), kind);
                }
            }
            if scaling.get("rope_type").and_then(Value::as_str) == Some("default") {
                value.insert("rope_scaling".to_owned(), Value::Null);
            }
        }
        Value::Object(value)
    }

    /// Deserializes the normalized config into a family's typed config. A
    /// failure names the offending key.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        let file = self
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config.json".to_owned());
        serde_path_to_error::deserialize(self.normalized()).map_err(|e| {
            let key = e.path().to_string();
            Error::Config {
                file,
                key: if key == "." { "<root>".into() } else { key },
                message: e.into_inner().to_string(),
            }
        })
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v5_rope_parameters_become_top_level_keys() {
        let config = HfConfig::from_value(json!({
            "model_type": "llama",
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
        }))
        .unwrap();
        let n = config.normalized();
        assert_eq!(n["rope_theta"], json!(500000.0));
        assert_eq!(n["rope_scaling"]["rope_type"], json!("llama3"));
        assert_eq!(n["rope_scaling"]["factor"], json!(8.0));
        assert!(n["rope_scaling"].get("rope_theta").is_none());
    }

    #[test]
    fn v5_partial_rotary_factor_goes_back_to_the_top_level() {
        let config = HfConfig::from_value(json!({
            "rope_parameters": {"rope_type": "default", "rope_theta": 1.0, "partial_rotary_factor": 0.5}
        }))
        .unwrap();
        let n = config.normalized();
        assert_eq!(n["partial_rotary_factor"], json!(0.5));
        assert!(n["rope_scaling"].is_null());
    }

    #[test]
    fn v5_default_rope_means_no_scaling() {
        let config = HfConfig::from_value(json!({
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}
        }))
        .unwrap();
        let n = config.normalized();
        assert_eq!(n["rope_theta"], json!(10000.0));
        assert!(n["rope_scaling"].is_null());
    }

    #[test]
    fn v4_type_key_is_copied_to_rope_type() {
        let config = HfConfig::from_value(json!({
            "rope_theta": 20000.0,
            "rope_scaling": {"type": "linear", "factor": 2.0}
        }))
        .unwrap();
        let n = config.normalized();
        assert_eq!(n["rope_theta"], json!(20000.0));
        assert_eq!(n["rope_scaling"]["rope_type"], json!("linear"));
    }

    #[test]
    fn non_object_config_is_rejected() {
        let err = HfConfig::from_value(json!([1, 2])).unwrap_err();
        assert!(err
            .to_string()
            .contains("expected a JSON object, found an array"));
    }

    #[test]
    fn parse_errors_name_the_key() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct C {
            hidden_size: usize,
        }
        let config = HfConfig::from_value(json!({"hidden_size": "big"})).unwrap();
        let err = config.parse::<C>().unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }
}

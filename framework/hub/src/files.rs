//! Which of a repository's files a model needs: its configuration and
//! tokenizer files, and one set of weights (the shards an index lists, else
//! the root-level safetensors, else PyTorch `.bin`, else `.npz`). READMEs,
//! images, ONNX/GGUF exports and duplicate weight formats are left on the hub.

use crate::HubError;
use std::collections::BTreeSet;
use std::path::Path;

/// Configuration, tokenizer and adapter files fetched whenever a repository
/// has them.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
];

/// Weight indexes, in order of preference.
const INDEXES: &[&str] = &[
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
];

/// What to fetch from a repository, decided from its file listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePlan {
    /// Files to fetch as they are.
    pub files: Vec<String>,
    /// A weight index to fetch first; the shards it names follow.
    pub index: Option<String>,
}

impl FilePlan {
    /// Decides from the repository's file names (paths relative to its root).
    ///
    /// Fails when the repository holds neither a `config.json` nor an
    /// `adapter_config.json`, or no weights in a format mlx-zoo reads.
    pub fn from_listing(repo: &str, listing: &[String]) -> Result<Self, HubError> {
        let root: BTreeSet<&str> = listing
            .iter()
            .map(String::as_str)
            .filter(|name| !name.contains('/'))
            .collect();
        if !root.contains("config.json") && !root.contains("adapter_config.json") {
            return Err(HubError::NotAModel {
                repo: repo.to_string(),
                reason: "it has no config.json (nor adapter_config.json)".into(),
                files: listing.to_vec(),
            });
        }
        let mut files: Vec<String> = SIDE_FILES
            .iter()
            .filter(|name| root.contains(**name))
            .map(|name| name.to_string())
            .collect();
        if let Some(index) = INDEXES.iter().find(|name| root.contains(**name)) {
            return Ok(Self {
                files,
                index: Some(index.to_string()),
            });
        }
        let with_suffix = |suffix: &str| -> Vec<String> {
            root.iter()
                .filter(|name| name.ends_with(suffix))
                .map(|name| name.to_string())
                .collect()
        };
        let weights = [
            with_suffix(".safetensors"),
            with_suffix(".bin")
                .into_iter()
                .filter(|name| name.starts_with("pytorch_model") || name.starts_with("adapter_model"))
                .collect(),
            with_suffix(".npz"),
        ]
        .into_iter()
        .find(|set| !set.is_empty())
        .ok_or_else(|| HubError::NotAModel {
            repo: repo.to_string(),
            reason: "it has no weights mlx-zoo reads (safetensors, pytorch_model*.bin or .npz at its root)"
                .into(),
            files: listing.to_vec(),
        })?;
        files.extend(weights);
        Ok(Self { files, index: None })
    }
}

/// The shard file names a weight index (`*.index.json`) lists, each once,
/// sorted.
pub fn shards_of_index(path: &Path) -> Result<Vec<String>, HubError> {
    let bad = |reason: String| HubError::BadIndex {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(|map| map.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map.{tensor}` is not a file name")))?;
        if file.contains("..") || file.starts_with('/') {
            return Err(bad(format!(
                "`weight_map.{tensor}` points outside the repository: {file}"
            )));
        }
        if !shards.iter().any(|known| known == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn an_index_wins_and_other_formats_stay_on_the_hub() {
        let plan = FilePlan::from_listing(
            "o/m",
            &listing(&[
                "README.md",
                "config.json",
                "tokenizer.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "consolidated.safetensors",
                "pytorch_model.bin",
                "original/consolidated.00.pth",
                "onnx/model.onnx",
            ]),
        )
        .unwrap();
        assert_eq!(plan.files, ["config.json", "tokenizer.json"]);
        assert_eq!(plan.index.as_deref(), Some("model.safetensors.index.json"));
    }

    #[test]
    fn safetensors_before_bin_before_npz() {
        let plan = FilePlan::from_listing(
            "o/m",
            &listing(&[
                "config.json",
                "model.safetensors",
                "pytorch_model.bin",
                "weights.npz",
            ]),
        )
        .unwrap();
        assert_eq!(plan.files, ["config.json", "model.safetensors"]);
        let plan = FilePlan::from_listing(
            "o/m",
            &listing(&[
                "config.json",
                "pytorch_model.bin",
                "training_args.bin",
                "weights.npz",
            ]),
        )
        .unwrap();
        assert_eq!(plan.files, ["config.json", "pytorch_model.bin"]);
        let plan = FilePlan::from_listing(
            "o/a",
            &listing(&["adapter_config.json", "adapter_model.safetensors"]),
        )
        .unwrap();
        assert_eq!(
            plan.files,
            ["adapter_config.json", "adapter_model.safetensors"]
        );
    }

    #[test]
    fn a_repo_without_config_or_weights_is_refused() {
        let error = FilePlan::from_listing("o/d", &listing(&["data.jsonl"])).unwrap_err();
        assert!(error.to_string().contains("no config.json"), "{error}");
        let error =
            FilePlan::from_listing("o/g", &listing(&["config.json", "model.gguf"])).unwrap_err();
        assert!(error.to_string().contains("no weights"), "{error}");
    }
}

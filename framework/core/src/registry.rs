//! The plugin registry.
//!
//! Plugin crates submit a static registration through `inventory` (see
//! [`register_architecture!`](crate::register_architecture)); a [`Registry`]
//! built with [`Registry::from_inventory`] sees every plugin linked into the
//! binary. Embedders and tests can also start from [`Registry::empty`] and
//! [`Registry::register`] their own. Resolution asks every architecture to
//! detect the config and picks the single highest priority; a tie is an
//! error naming every candidate, and no match is an error naming the closest
//! registered names.
//!
//! A plugin crate that nothing references can be dropped by the linker, and
//! its registration with it: the `mlx-zoo` facade crate references every
//! built-in plugin, and a third-party plugin must be referenced the same way
//! (`use my_plugin as _;`) by the binary that wants it.

use crate::adapter::Adapter;
use crate::architecture::{ArchitectureInfo, Detection, DynArchitecture, Prepared};
use crate::config::HfConfig;
use crate::error::{Error, Result};
use crate::quantize::Quantizer;
use serde::Serialize;
use std::sync::Arc;

/// A static architecture registration, submitted with `inventory`.
pub struct ArchitectureRegistration {
    architecture: &'static dyn DynArchitecture,
}

impl ArchitectureRegistration {
    /// Wraps a static architecture.
    pub const fn new(architecture: &'static dyn DynArchitecture) -> Self {
        Self { architecture }
    }
}

/// A static quantizer registration, submitted with `inventory`.
pub struct QuantizerRegistration {
    quantizer: &'static dyn Quantizer,
}

impl QuantizerRegistration {
    /// Wraps a static quantizer.
    pub const fn new(quantizer: &'static dyn Quantizer) -> Self {
        Self { quantizer }
    }
}

/// A static adapter registration, submitted with `inventory`.
pub struct AdapterRegistration {
    adapter: &'static dyn Adapter,
}

impl AdapterRegistration {
    /// Wraps a static adapter.
    pub const fn new(adapter: &'static dyn Adapter) -> Self {
        Self { adapter }
    }
}

inventory::collect!(ArchitectureRegistration);
inventory::collect!(QuantizerRegistration);
inventory::collect!(AdapterRegistration);

/// Registers an architecture value (a `const`-constructible
/// [`Architecture`](crate::Architecture) that is `Clone`) with every
/// registry built from inventory.
///
/// ```ignore
/// #[derive(Clone, Copy)]
/// pub struct MyFamily;
/// // impl mlx_zoo_core::Architecture for MyFamily { ... }
/// mlx_zoo_core::register_architecture!(MyFamily);
/// ```
#[macro_export]
macro_rules! register_architecture {
    ($architecture:expr) => {
        $crate::inventory::submit! {
            $crate::registry::ArchitectureRegistration::new(&$architecture)
        }
    };
}

/// Registers a quantizer value with every registry built from inventory.
#[macro_export]
macro_rules! register_quantizer {
    ($quantizer:expr) => {
        $crate::inventory::submit! {
            $crate::registry::QuantizerRegistration::new(&$quantizer)
        }
    };
}

/// Registers an adapter value with every registry built from inventory.
#[macro_export]
macro_rules! register_adapter {
    ($adapter:expr) => {
        $crate::inventory::submit! {
            $crate::registry::AdapterRegistration::new(&$adapter)
        }
    };
}

/// One architecture's answer during resolution.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// The architecture.
    pub name: String,
    /// Its answer.
    pub detection: Detection,
}

/// The architecture chosen for a config, with every candidate's answer.
pub struct Resolution {
    /// The chosen architecture.
    pub architecture: Arc<dyn DynArchitecture>,
    /// Why it was chosen.
    pub reason: String,
    /// What every registered architecture answered, sorted by name.
    pub candidates: Vec<Candidate>,
}

impl Resolution {
    /// Parses the config with the chosen architecture.
    pub fn prepare(&self, config: &HfConfig) -> Result<Prepared> {
        self.architecture.prepare(config)
    }
}

/// A set of plugins.
#[derive(Clone, Default)]
pub struct Registry {
    architectures: Vec<Arc<dyn DynArchitecture>>,
    quantizers: Vec<Arc<dyn Quantizer>>,
    adapters: Vec<Arc<dyn Adapter>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "architectures",
                &self
                    .architectures
                    .iter()
                    .map(|a| a.name())
                    .collect::<Vec<_>>(),
            )
            .field(
                "quantizers",
                &self.quantizers.iter().map(|q| q.name()).collect::<Vec<_>>(),
            )
            .field(
                "adapters",
                &self.adapters.iter().map(|a| a.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

struct Static<T: ?Sized + 'static>(&'static T);

impl<T: DynArchitecture + ?Sized> DynArchitecture for Static<T> {
    fn info(&self) -> ArchitectureInfo {
        self.0.info()
    }
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn detect(&self, config: &HfConfig) -> Detection {
        self.0.detect(config)
    }
    fn prepare(&self, config: &HfConfig) -> Result<Prepared> {
        self.0.prepare(config)
    }
}

impl<T: Quantizer + ?Sized> Quantizer for Static<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn supported_bits(&self) -> &'static [u8] {
        self.0.supported_bits()
    }
    fn supported_group_sizes(&self) -> &'static [usize] {
        self.0.supported_group_sizes()
    }
    fn quantize(
        &self,
        weight: &mlx_rs::Array,
        settings: crate::quantize::QuantSettings,
    ) -> Result<crate::quantize::QuantizedTensor> {
        self.0.quantize(weight, settings)
    }
    fn dequantize(&self, tensor: &crate::quantize::QuantizedTensor) -> Result<mlx_rs::Array> {
        self.0.dequantize(tensor)
    }
}

impl<T: Adapter + ?Sized> Adapter for Static<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn init(
        &self,
        base_weight: &mlx_rs::Array,
        settings: &crate::adapter::AdapterSettings,
    ) -> Result<crate::adapter::AdapterParams> {
        self.0.init(base_weight, settings)
    }
    fn uses_base_weight(&self) -> bool {
        self.0.uses_base_weight()
    }
    fn forward(
        &self,
        x: &mlx_rs::Array,
        base_output: &mlx_rs::Array,
        base_weight: Option<&mlx_rs::Array>,
        params: &crate::adapter::AdapterParams,
        settings: &crate::adapter::AdapterSettings,
    ) -> Result<mlx_rs::Array> {
        self.0
            .forward(x, base_output, base_weight, params, settings)
    }
    fn gather_forward(
        &self,
        x: &mlx_rs::Array,
        base_output: &mlx_rs::Array,
        indices: &mlx_rs::Array,
        params: &crate::adapter::AdapterParams,
        settings: &crate::adapter::AdapterSettings,
    ) -> Result<mlx_rs::Array> {
        self.0
            .gather_forward(x, base_output, indices, params, settings)
    }
    fn merge(
        &self,
        base_weight: &mlx_rs::Array,
        params: &crate::adapter::AdapterParams,
        settings: &crate::adapter::AdapterSettings,
    ) -> Result<mlx_rs::Array> {
        self.0.merge(base_weight, params, settings)
    }
}

impl Registry {
    /// A registry with no plugins.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A registry of every plugin submitted through `inventory` in this
    /// binary. Two plugins of one kind with the same name are an error.
    pub fn from_inventory() -> Result<Self> {
        let mut registry = Self::empty();
        for registration in inventory::iter::<ArchitectureRegistration> {
            registry.insert_architecture(Arc::new(Static(registration.architecture)), false)?;
        }
        for registration in inventory::iter::<QuantizerRegistration> {
            registry.register_quantizer(Arc::new(Static(registration.quantizer)))?;
        }
        for registration in inventory::iter::<AdapterRegistration> {
            registry.register_adapter(Arc::new(Static(registration.adapter)))?;
        }
        Ok(registry)
    }

    /// Adds an architecture; an existing one of the same name is an error.
    pub fn register(&mut self, architecture: impl DynArchitecture + 'static) -> Result<()> {
        self.insert_architecture(Arc::new(architecture), false)
    }

    /// Adds an architecture, replacing one of the same name.
    pub fn register_or_replace(&mut self, architecture: impl DynArchitecture + 'static) {
        // Replacing cannot fail.
        let _ = self.insert_architecture(Arc::new(architecture), true);
    }

    fn insert_architecture(
        &mut self,
        architecture: Arc<dyn DynArchitecture>,
        replace: bool,
    ) -> Result<()> {
        let name = architecture.name();
        match self.architectures.iter().position(|a| a.name() == name) {
            Some(_) if !replace => Err(Error::DuplicateArchitecture {
                name: name.to_owned(),
            }),
            Some(i) => {
                self.architectures[i] = architecture;
                Ok(())
            }
            None => {
                self.architectures.push(architecture);
                self.architectures.sort_by_key(|a| a.name());
                Ok(())
            }
        }
    }

    /// Adds a quantizer; a duplicate name is an error.
    pub fn register_quantizer(&mut self, quantizer: Arc<dyn Quantizer>) -> Result<()> {
        if self.quantizers.iter().any(|q| q.name() == quantizer.name()) {
            return Err(Error::DuplicatePlugin {
                kind: "quantizer",
                name: quantizer.name().to_owned(),
            });
        }
        self.quantizers.push(quantizer);
        self.quantizers.sort_by_key(|q| q.name());
        Ok(())
    }

    /// Adds an adapter; a duplicate name is an error.
    pub fn register_adapter(&mut self, adapter: Arc<dyn Adapter>) -> Result<()> {
        if self.adapters.iter().any(|a| a.name() == adapter.name()) {
            return Err(Error::DuplicatePlugin {
                kind: "adapter",
                name: adapter.name().to_owned(),
            });
        }
        self.adapters.push(adapter);
        self.adapters.sort_by_key(|a| a.name());
        Ok(())
    }

    /// Every architecture, sorted by name.
    pub fn architectures(&self) -> Vec<ArchitectureInfo> {
        self.architectures.iter().map(|a| a.info()).collect()
    }

    /// The architecture called `name`.
    pub fn architecture(&self, name: &str) -> Option<Arc<dyn DynArchitecture>> {
        self.architectures
            .iter()
            .find(|a| a.name() == name)
            .cloned()
    }

    /// Every quantizer, sorted by name.
    pub fn quantizers(&self) -> &[Arc<dyn Quantizer>] {
        &self.quantizers
    }

    /// The quantizer called `name`.
    pub fn quantizer(&self, name: &str) -> Option<Arc<dyn Quantizer>> {
        self.quantizers.iter().find(|q| q.name() == name).cloned()
    }

    /// The adapter method called `name`.
    pub fn adapter(&self, name: &str) -> Option<Arc<dyn Adapter>> {
        self.adapters.iter().find(|a| a.name() == name).cloned()
    }

    /// Every adapter, sorted by name.
    pub fn adapters(&self) -> &[Arc<dyn Adapter>] {
        &self.adapters
    }

    /// Picks the one architecture that handles `config`.
    pub fn resolve(&self, config: &HfConfig) -> Result<Resolution> {
        let answers: Vec<(Arc<dyn DynArchitecture>, Detection)> = self
            .architectures
            .iter()
            .map(|a| (a.clone(), a.detect(config)))
            .collect();
        let best = answers
            .iter()
            .filter_map(|(_, d)| match d {
                Detection::Match { priority, .. } => Some(*priority),
                Detection::NoMatch { .. } => None,
            })
            .max();
        let candidates = answers
            .iter()
            .map(|(a, d)| Candidate {
                name: a.name().to_owned(),
                detection: d.clone(),
            })
            .collect();
        let Some(best) = best else {
            return Err(self.unknown(config));
        };
        let winners: Vec<&(Arc<dyn DynArchitecture>, Detection)> = answers
            .iter()
            .filter(|(_, d)| matches!(d, Detection::Match { priority, .. } if *priority == best))
            .collect();
        if winners.len() > 1 {
            return Err(Error::AmbiguousArchitecture {
                candidates: winners
                    .iter()
                    .map(|(a, d)| match d {
                        Detection::Match { priority, reason } => {
                            format!("{} (priority {priority}: {reason})", a.name())
                        }
                        Detection::NoMatch { reason } => format!("{} ({reason})", a.name()),
                    })
                    .collect(),
            });
        }
        let (architecture, detection) = winners[0].clone();
        let reason = match detection {
            Detection::Match { priority, reason } => format!("{reason} (priority {priority})"),
            Detection::NoMatch { reason } => reason,
        };
        Ok(Resolution {
            architecture,
            reason,
            candidates,
        })
    }

    fn unknown(&self, config: &HfConfig) -> Error {
        let model_type = config.model_type().map(str::to_owned);
        let mut claimed: Vec<String> = Vec::new();
        for a in &self.architectures {
            let info = a.info();
            claimed.push(info.name);
            claimed.extend(info.model_types);
        }
        claimed.sort();
        claimed.dedup();
        let closest = match &model_type {
            Some(t) => closest_names(t, &claimed),
            None => Vec::new(),
        };
        Error::UnknownArchitecture {
            model_type,
            architectures: config
                .architectures()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            closest,
            known: self
                .architectures
                .iter()
                .map(|a| a.name().to_owned())
                .collect(),
        }
    }
}

/// Registered names within a small edit distance of `wanted`, or sharing a
/// prefix with it, closest first.
fn closest_names(wanted: &str, names: &[String]) -> Vec<String> {
    let wanted = wanted.to_lowercase();
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .filter_map(|name| {
            let distance = edit_distance(&wanted, &name.to_lowercase());
            let related = wanted.starts_with(name.as_str()) || name.starts_with(&wanted);
            (distance <= 2.max(wanted.len() / 3) || related).then_some((distance, name))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, n)| n.clone()).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("llama", "llama"), 0);
        assert_eq!(edit_distance("lama", "llama"), 1);
        assert_eq!(edit_distance("qwen3", "qwen2"), 1);
    }

    #[test]
    fn closest_names_prefers_small_distances_and_prefixes() {
        let names = vec![
            "llama".to_string(),
            "mistral".to_string(),
            "phi".to_string(),
        ];
        assert_eq!(closest_names("lama", &names), vec!["llama"]);
        assert_eq!(closest_names("llama4", &names), vec!["llama"]);
        assert!(closest_names("bert", &names).is_empty());
    }
}

//! burn's persistent kernel cache for the wgpu backend.
//!
//! A fresh process on wgpu compiles every kernel it launches before its first training steps
//! finish, so a device's first round is several times slower than the next ones. burn (through
//! cubecl) can keep compiled kernels (SPIR-V, with burn's `vulkan` feature) and autotune results
//! on disk and load them in the next process: the `persistence` feature plus cubecl's
//! `compilation.cache` setting. Device builds (the SDK's `wgpu` feature) turn both on; this module
//! sets the run-time part before the wgpu runtime starts.
//!
//! `FEDHIVE_KERNEL_CACHE` chooses: unset or empty = on, in cubecl's default place (`target/environment`
//! under a cargo workspace, else the user cache directory); `off` = no compilation cache; any other
//! value = on, under that directory.

use std::path::PathBuf;

/// Environment variable read by [`KernelCache::from_env`].
pub const KERNEL_CACHE_ENV: &str = "FEDHIVE_KERNEL_CACHE";

/// Whether compiled wgpu kernels persist between processes, and where cubecl keeps its caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCache {
    /// Load and store compiled kernels (`false`: compile every kernel in every new process).
    pub enabled: bool,
    /// Directory of cubecl's caches (compiled kernels and autotune results); `None`: cubecl's
    /// default place.
    pub dir: Option<PathBuf>,
}

impl Default for KernelCache {
    fn default() -> Self {
        KernelCache {
            enabled: true,
            dir: None,
        }
    }
}

impl KernelCache {
    /// The setting `FEDHIVE_KERNEL_CACHE` asks for (see the module docs).
    pub fn from_env() -> KernelCache {
        match std::env::var(KERNEL_CACHE_ENV) {
            Ok(v) if v.trim() == "off" => KernelCache {
                enabled: false,
                dir: None,
            },
            Ok(v) if !v.trim().is_empty() => KernelCache {
                enabled: true,
                dir: Some(PathBuf::from(v.trim())),
            },
            _ => KernelCache::default(),
        }
    }

    /// Installs this setting as cubecl's process-wide configuration (on top of any `cubecl.toml`
    /// and `CUBECL_*` variables). It must run before the first wgpu device starts; returns
    /// `false`, changing nothing, when cubecl's configuration was already fixed (by the
    /// application, or by a device that already started).
    #[cfg(feature = "wgpu")]
    pub fn install(&self) -> bool {
        use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};

        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.compilation.cache = self.enabled;
        if let Some(dir) = &self.dir {
            config.environment.path = CacheConfig::Directory(dir.clone());
        }
        CubeClRuntimeConfig::try_set(config)
    }
}

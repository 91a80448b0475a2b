//! Run-time choice of the compute backend.
//!
//! burn 0.22 picks the backend through the [`Device`] value, so one binary can train on the CPU
//! (`flex`, always available) or on a GPU through wgpu (Vulkan, Metal, DX12; needs the `wgpu`
//! feature). Asking for wgpu in a build without it is an error, not a silent CPU fallback, so a
//! misconfigured fleet is noticed.
//!
//! With the `vulkan` feature, Vulkan adapters run cubecl's SPIR-V kernels, which burn can persist:
//! [`enable_kernel_cache`] points that cache at a directory of the app's, so only a device's first
//! process compiles its kernels (docs/benchmarks.md, "Kernel cache"). Other adapters (Metal, DX12,
//! WebGPU) keep WGSL, compiled by the driver in every process.

use std::str::FromStr;

use burn::tensor::Device;

/// Environment variable read by [`Backend::from_env`].
pub const BACKEND_ENV: &str = "FEDHIVE_BACKEND";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// wgpu on the best adapter the machine offers (a software Vulkan such as lavapipe counts).
    Wgpu,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend `{0}` (expected `flex` or `wgpu`)")]
    Unknown(String),
    #[error(
        "backend `{0}` was not compiled in; rebuild with the `{0}` cargo feature \
         (e.g. `cargo run -p fedhive-sim --features {0} -- ...`)"
    )]
    NotCompiled(&'static str),
    #[error("wgpu found no usable adapter: {0}")]
    WgpuInit(String),
    #[error(
        "the kernel cache must be enabled before the first wgpu device or tensor of the process \
         (cubecl's configuration was already read)"
    )]
    KernelCacheTooLate,
    #[error("kernel cache directory {}: {reason}", path.display())]
    KernelCacheDir {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Persists compiled GPU kernels under `dir`, so later processes load them instead of compiling.
///
/// Call it once, before the first wgpu device or tensor of the process. The cache holds SPIR-V for
/// Vulkan adapters, keyed by the adapter's vendor and device ids and the binary's build id (an
/// app update compiles afresh); a corrupt or foreign entry costs a recompile, not an error. Without
/// the `vulkan` feature there is nothing to persist and this returns
/// [`BackendError::NotCompiled`].
pub fn enable_kernel_cache(dir: &std::path::Path) -> Result<(), BackendError> {
    std::fs::create_dir_all(dir).map_err(|e| BackendError::KernelCacheDir {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    kernel_cache::enable(dir)
}

#[cfg(feature = "vulkan")]
mod kernel_cache {
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};

    use super::BackendError;

    pub(super) fn enable(dir: &std::path::Path) -> Result<(), BackendError> {
        let mut config = CubeClRuntimeConfig::default();
        config.compilation.cache = true;
        config.environment.path = CacheConfig::Directory(dir.to_path_buf());
        if CubeClRuntimeConfig::try_set(config) {
            Ok(())
        } else {
            Err(BackendError::KernelCacheTooLate)
        }
    }
}

#[cfg(not(feature = "vulkan"))]
mod kernel_cache {
    use super::BackendError;

    pub(super) fn enable(_dir: &std::path::Path) -> Result<(), BackendError> {
        Err(BackendError::NotCompiled("vulkan"))
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Wgpu => "wgpu",
        }
    }

    /// `FEDHIVE_BACKEND` (`flex` or `wgpu`), `flex` when unset or empty.
    pub fn from_env() -> Result<Backend, BackendError> {
        match std::env::var(BACKEND_ENV) {
            Ok(v) if !v.trim().is_empty() => v.trim().parse(),
            _ => Ok(Backend::Flex),
        }
    }

    /// The device to train on (without autodiff; training enables it itself).
    ///
    /// For wgpu the runtime is initialised eagerly on first call so that a machine without an
    /// adapter fails here with a message rather than panicking inside the first tensor operation.
    pub fn device(&self) -> Result<Device, BackendError> {
        match self {
            Backend::Flex => flex_device(),
            Backend::Wgpu => wgpu_device(),
        }
    }

    /// Human-readable description of the device `device()` returns, e.g. the wgpu adapter name.
    pub fn describe(&self) -> Result<String, BackendError> {
        match self {
            Backend::Flex => flex_device().map(|_| "flex (pure-Rust CPU)".to_string()),
            Backend::Wgpu => wgpu_adapter(),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flex" => Ok(Backend::Flex),
            "wgpu" => Ok(Backend::Wgpu),
            other => Err(BackendError::Unknown(other.to_string())),
        }
    }
}

#[cfg(feature = "flex")]
fn flex_device() -> Result<Device, BackendError> {
    Ok(Device::flex())
}

#[cfg(not(feature = "flex"))]
fn flex_device() -> Result<Device, BackendError> {
    Err(BackendError::NotCompiled("flex"))
}

#[cfg(feature = "wgpu")]
mod wgpu_runtime {
    use std::sync::OnceLock;

    use burn::tensor::Device;

    use super::BackendError;

    /// The initialised device and its adapter's description. burn refuses to initialise a wgpu
    /// runtime twice, so the first outcome (success or failure) is kept for the process.
    static WGPU: OnceLock<Result<(Device, String), String>> = OnceLock::new();

    fn init() -> &'static Result<(Device, String), String> {
        WGPU.get_or_init(|| {
            let (device, setup) = Device::wgpu_options()
                .init_with_setup()
                .map_err(|e| e.to_string())?;
            let info = setup.adapter.get_info();
            let description = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
            Ok((device, description))
        })
    }

    pub(super) fn device() -> Result<Device, BackendError> {
        init()
            .as_ref()
            .map(|(d, _)| d.clone())
            .map_err(|e| BackendError::WgpuInit(e.clone()))
    }

    pub(super) fn adapter() -> Result<String, BackendError> {
        init()
            .as_ref()
            .map(|(_, a)| a.clone())
            .map_err(|e| BackendError::WgpuInit(e.clone()))
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device, BackendError> {
    wgpu_runtime::device()
}

#[cfg(feature = "wgpu")]
fn wgpu_adapter() -> Result<String, BackendError> {
    wgpu_runtime::adapter()
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device, BackendError> {
    Err(BackendError::NotCompiled("wgpu"))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_adapter() -> Result<String, BackendError> {
    Err(BackendError::NotCompiled("wgpu"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("flex".parse(), Ok(Backend::Flex));
        assert_eq!("wgpu".parse(), Ok(Backend::Wgpu));
        assert_eq!(
            "cuda".parse::<Backend>(),
            Err(BackendError::Unknown("cuda".into()))
        );
        assert_eq!(Backend::Wgpu.to_string(), "wgpu");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_is_a_clear_error() {
        let err = Backend::Wgpu.device().unwrap_err();
        assert_eq!(err, BackendError::NotCompiled("wgpu"));
        assert!(err.to_string().contains("--features wgpu"));
    }

    #[cfg(not(feature = "vulkan"))]
    #[test]
    fn the_kernel_cache_without_the_feature_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = enable_kernel_cache(dir.path()).unwrap_err();
        assert_eq!(err, BackendError::NotCompiled("vulkan"));
        assert!(err.to_string().contains("--features vulkan"));
    }
}

//! Facts about the MLX runtime this process runs on, and the choice of
//! device: versions, the backend MLX was built with, the default device and
//! the GPU (when the build has one), which BLAS library MLX's CPU matmuls actually reach (and its
//! thread count, which the trainer lowers while streams share the cores),
//! and memory figures. The BLAS is read from the libraries loaded into the process, so
//! it reports what runs, not what was intended at build time.

use serde::Serialize;

/// Which BLAS implementation serves MLX's CPU matmuls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlasInfo {
    /// `OpenBLAS`, `reference BLAS`, `MKL`, `Accelerate` or `unknown`.
    pub name: String,
    /// The library file, when known.
    pub library: Option<String>,
    /// Whether this BLAS is known to be slow (the reference implementation).
    pub slow: bool,
}

/// MLX memory figures, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryInfo {
    /// Memory held by live arrays.
    pub active: usize,
    /// Highest `active` since start (or the last reset).
    pub peak: usize,
    /// Memory kept in MLX's buffer cache.
    pub cache: usize,
    /// MLX's memory limit.
    pub limit: usize,
}

/// The GPU of a GPU build of MLX (CUDA or Metal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    /// The device's name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Its total memory in bytes (0 when the backend does not say).
    pub total_memory: usize,
    /// How many GPUs MLX can use.
    pub count: usize,
}

/// Where MLX computes: `--device` / `ZOO_DEVICE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The GPU when the build has a usable one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The GPU; an error when there is none.
    Gpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = crate::Error;

    fn from_str(text: &str) -> crate::Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "gpu" | "cuda" | "metal" => Ok(Self::Gpu),
            other => Err(crate::Error::InvalidArgument(format!(
                "device `{other}`: expected cpu, gpu or auto"
            ))),
        }
    }
}

impl DeviceChoice {
    /// Reads `ZOO_DEVICE` (auto when unset).
    pub fn from_env() -> crate::Result<Self> {
        match std::env::var("ZOO_DEVICE") {
            Ok(value) => value.parse().map_err(|e: crate::Error| {
                crate::Error::InvalidArgument(format!("ZOO_DEVICE: {e}"))
            }),
            Err(_) => Ok(Self::Auto),
        }
    }
}

/// The GPU the linked MLX can use, if any (`None` on a CPU build, or when
/// the GPU backend finds no usable device or driver).
pub fn gpu_info() -> Option<GpuInfo> {
    let mut name = [0 as std::ffi::c_char; 256];
    let mut total_memory = 0usize;
    // SAFETY: the buffer and the out-parameter are live for the call, and
    // the function writes at most `name.len()` bytes, NUL-terminated.
    let count = unsafe { mlx_sys::zoo_gpu_info(name.as_mut_ptr(), name.len(), &mut total_memory) };
    if count <= 0 {
        return None;
    }
    // SAFETY: zoo_gpu_info NUL-terminates the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Some(GpuInfo {
        name,
        total_memory,
        count: count as usize,
    })
}

/// Makes MLX compute on the device `choice` names, for every array made
/// after the call on any thread; returns `gpu` or `cpu`. MLX itself starts
/// on the GPU when its build has a usable one.
pub fn select_device(choice: DeviceChoice) -> crate::Result<&'static str> {
    let gpu = gpu_info().is_some();
    let use_gpu = match choice {
        DeviceChoice::Auto => gpu,
        DeviceChoice::Cpu => false,
        DeviceChoice::Gpu if gpu => true,
        DeviceChoice::Gpu => {
            return Err(crate::Error::InvalidArgument(format!(
                "no GPU: this MLX build ({} backend) has none usable{}",
                mlx_sys::BACKEND,
                if mlx_sys::BACKEND == "cpu" {
                    "; build with MLX_ZOO_BACKEND=cuda for NVIDIA GPUs"
                } else {
                    " (is the NVIDIA driver loaded?)"
                }
            )))
        }
    };
    let device = if use_gpu {
        mlx_rs::Device::gpu()
    } else {
        mlx_rs::Device::cpu()
    };
    mlx_rs::Device::set_default(&device);
    Ok(if use_gpu { "gpu" } else { "cpu" })
}

/// Whether the current default stream computes on the CPU: the CPU-only
/// machinery (concurrent CPU streams, BLAS thread control, the own CPU
/// kernels, chunked causal attention) applies only then.
pub fn on_cpu() -> bool {
    let stream = mlx_rs::Stream::thread_local_or_default();
    // SAFETY: the stream is a live handle; the device handle is created
    // here and freed after its type is read.
    unsafe {
        let mut device = mlx_sys::mlx_device_new();
        let mut kind = mlx_sys::mlx_device_type__MLX_CPU;
        let ok = mlx_sys::mlx_stream_get_device(&mut device, stream.as_ptr()) == 0
            && mlx_sys::mlx_device_get_type(&mut kind, device) == 0;
        mlx_sys::mlx_device_free(device);
        !ok || kind == mlx_sys::mlx_device_type__MLX_CPU
    }
}

/// Everything `zoo info` prints.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeInfo {
    /// MLX version.
    pub mlx_version: String,
    /// mlx-c version of the bindings.
    pub mlx_c_version: String,
    /// The backend MLX was built with: `cpu`, `cuda` or `metal`.
    pub backend: String,
    /// The default device, e.g. `cpu`.
    pub device: String,
    /// The GPU, when the build has a usable one.
    pub gpu: Option<GpuInfo>,
    /// The MLX library loaded (the one linked at build time when the loader
    /// does not say).
    pub libmlx: String,
    /// The BLAS in use.
    pub blas: BlasInfo,
    /// OpenBLAS's threads per call (`None` for other BLAS libraries).
    pub blas_threads: Option<usize>,
    /// CPU cores this process may use (the trainer's default stream count).
    pub cores: usize,
    /// `MLX_BFS_MAX_WIDTH`: how wide MLX interleaves independent work
    /// (mlx-sys sets 4096 unless the environment does).
    pub bfs_max_width: Option<String>,
    /// The instruction set of mlx-zoo's own CPU kernels (`avx2+fma` or
    /// `generic`).
    pub kernels: String,
    /// Memory figures.
    pub memory: MemoryInfo,
}

/// Reads the runtime facts.
pub fn runtime_info() -> RuntimeInfo {
    let device = mlx_rs::Device::try_default()
        .ok()
        .and_then(|d| d.get_type().ok())
        .map(|t| format!("{t:?}").to_lowercase())
        .unwrap_or_else(|| "unknown".into());
    RuntimeInfo {
        mlx_version: mlx_version(),
        mlx_c_version: mlx_sys::MLX_C_VERSION.to_owned(),
        backend: mlx_sys::BACKEND.to_owned(),
        device,
        gpu: gpu_info(),
        libmlx: loaded_libraries()
            .into_iter()
            .find(|l| l.contains("libmlx"))
            .unwrap_or_else(|| mlx_sys::LINKED_LIBMLX.to_owned()),
        blas: blas(),
        blas_threads: blas_threads(),
        kernels: crate::nn::kernels_isa().to_owned(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        bfs_max_width: std::env::var("MLX_BFS_MAX_WIDTH").ok(),
        memory: memory(),
    }
}

/// The current memory figures.
pub fn memory() -> MemoryInfo {
    MemoryInfo {
        active: mlx_rs::memory::active_memory().unwrap_or(0),
        peak: mlx_rs::memory::peak_memory().unwrap_or(0),
        cache: mlx_rs::memory::cache_memory().unwrap_or(0),
        limit: mlx_rs::memory::memory_limit().unwrap_or(0),
    }
}

/// The MLX version reported by the loaded library.
pub fn mlx_version() -> String {
    // Safety: mlx_version fills a freshly created mlx_string, which is
    // freed after its contents are copied out.
    unsafe {
        let mut s = mlx_sys::mlx_string_new();
        let version = if mlx_sys::mlx_version(&mut s) == 0 {
            let ptr = mlx_sys::mlx_string_data(s);
            if ptr.is_null() {
                None
            } else {
                Some(std::ffi::CStr::from_ptr(ptr).to_string_lossy().into_owned())
            }
        } else {
            None
        };
        mlx_sys::mlx_string_free(s);
        version.unwrap_or_else(|| mlx_sys::MLX_VERSION.to_owned())
    }
}

/// Which BLAS is loaded into this process.
pub fn blas() -> BlasInfo {
    let libraries = loaded_libraries();
    let find = |needle: &str| {
        libraries
            .iter()
            .find(|l| l.to_lowercase().contains(needle))
            .cloned()
    };
    if let Some(lib) = find("openblas") {
        return BlasInfo {
            name: "OpenBLAS".into(),
            library: Some(lib),
            slow: false,
        };
    }
    if let Some(lib) = find("mkl") {
        return BlasInfo {
            name: "MKL".into(),
            library: Some(lib),
            slow: false,
        };
    }
    if cfg!(target_vendor = "apple") {
        return BlasInfo {
            name: "Accelerate".into(),
            library: None,
            slow: false,
        };
    }
    if let Some(lib) = find("libblas") {
        return BlasInfo {
            name: "reference BLAS".into(),
            library: Some(lib),
            slow: true,
        };
    }
    BlasInfo {
        name: "unknown".into(),
        library: None,
        slow: false,
    }
}

/// Logs a warning when MLX runs on the slow reference BLAS. Binaries call it
/// once at start-up.
pub fn warn_if_slow_blas() {
    let blas = blas();
    if blas.slow {
        tracing::warn!(
            library = blas.library.as_deref().unwrap_or("?"),
            "MLX is using the reference BLAS, about 20x slower than OpenBLAS for matmuls; \
             install libopenblas-dev and rebuild (cargo clean -p mlx-sys)"
        );
    }
}

#[cfg(target_os = "linux")]
fn loaded_libraries() -> Vec<String> {
    unsafe extern "C" fn collect(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // Safety: called by dl_iterate_phdr with a valid info pointer and the
        // Vec passed below.
        unsafe {
            let names = &mut *(data as *mut Vec<String>);
            let name = (*info).dlpi_name;
            if !name.is_null() {
                let name = std::ffi::CStr::from_ptr(name)
                    .to_string_lossy()
                    .into_owned();
                if !name.is_empty() {
                    names.push(name);
                }
            }
        }
        0
    }
    let mut names: Vec<String> = Vec::new();
    // Safety: the callback only touches `names`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect),
            &mut names as *mut Vec<String> as *mut libc::c_void,
        );
    }
    names
}

#[cfg(not(target_os = "linux"))]
fn loaded_libraries() -> Vec<String> {
    Vec::new()
}

/// `openblas_get_num_threads` / `openblas_set_num_threads`, when OpenBLAS is
/// loaded into the process (looked up at run time: other BLAS libraries
/// have no such calls).
fn openblas_symbol(name: &std::ffi::CStr) -> Option<*mut std::ffi::c_void> {
    extern "C" {
        fn dlsym(
            handle: *mut std::ffi::c_void,
            symbol: *const std::ffi::c_char,
        ) -> *mut std::ffi::c_void;
    }
    // SAFETY: RTLD_DEFAULT (null) searches the loaded libraries; the name
    // is a valid C string.
    let found = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
    (!found.is_null()).then_some(found)
}

/// The threads OpenBLAS uses per call, or `None` without OpenBLAS.
pub fn blas_threads() -> Option<usize> {
    let symbol = openblas_symbol(c"openblas_get_num_threads")?;
    // SAFETY: OpenBLAS's `int openblas_get_num_threads(void)`.
    let get: extern "C" fn() -> std::ffi::c_int = unsafe { std::mem::transmute(symbol) };
    usize::try_from(get()).ok()
}

/// Sets the threads OpenBLAS uses per call; `false` without OpenBLAS.
pub fn set_blas_threads(threads: usize) -> bool {
    let Some(symbol) = openblas_symbol(c"openblas_set_num_threads") else {
        return false;
    };
    // SAFETY: OpenBLAS's `void openblas_set_num_threads(int)`.
    let set: extern "C" fn(std::ffi::c_int) = unsafe { std::mem::transmute(symbol) };
    set(threads.clamp(1, i32::MAX as usize) as std::ffi::c_int);
    true
}

/// Restores OpenBLAS's thread count when dropped; see
/// [`limit_blas_threads`].
#[derive(Debug)]
pub struct BlasThreadsGuard {
    previous: Option<usize>,
}

impl Drop for BlasThreadsGuard {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            set_blas_threads(previous);
        }
    }
}

/// Lowers OpenBLAS to `threads` (at least one) until the guard drops: work
/// that already runs on several MLX streams would otherwise start more BLAS
/// threads than there are cores.
pub fn limit_blas_threads(threads: usize) -> BlasThreadsGuard {
    let previous = blas_threads();
    if previous.is_some() {
        set_blas_threads(threads.max(1));
    }
    BlasThreadsGuard { previous }
}

#[cfg(test)]
mod blas_thread_tests {
    use super::*;

    #[test]
    fn openblas_threads_can_be_lowered_and_restored() {
        let Some(before) = blas_threads() else {
            return; // not OpenBLAS: nothing to steer
        };
        assert!(set_blas_threads(1));
        assert_eq!(blas_threads(), Some(1));
        assert!(set_blas_threads(before));
        assert_eq!(blas_threads(), Some(before));
    }

    #[test]
    fn the_evaluation_breadth_default_is_set_before_main() {
        let width = std::env::var("MLX_BFS_MAX_WIDTH").unwrap_or_default();
        assert!(!width.is_empty(), "mlx-sys sets MLX_BFS_MAX_WIDTH at load");
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn device_names_parse_and_others_are_named() {
        for (text, choice) in [
            ("", DeviceChoice::Auto),
            (" Auto ", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("GPU", DeviceChoice::Gpu),
            ("cuda", DeviceChoice::Gpu),
            ("metal", DeviceChoice::Gpu),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), choice, "{text:?}");
        }
        let message = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(message.contains("`tpu`") && message.contains("cpu, gpu or auto"));
    }

    /// On a build without a GPU (CI's), `auto` and `cpu` select the CPU and
    /// `gpu` is refused with what to do; on a GPU build, `gpu` selects it.
    #[test]
    fn selection_follows_what_the_build_has() {
        let gpu = gpu_info().is_some();
        assert_eq!(select_device(DeviceChoice::Cpu).unwrap(), "cpu");
        assert!(on_cpu());
        match select_device(DeviceChoice::Gpu) {
            Ok(device) => {
                assert!(gpu);
                assert_eq!(device, "gpu");
                assert!(!on_cpu());
            }
            Err(error) => {
                assert!(!gpu);
                assert!(error.to_string().contains("no GPU"), "{error}");
            }
        }
        let auto = select_device(DeviceChoice::Auto).unwrap();
        assert_eq!(auto, if gpu { "gpu" } else { "cpu" });
        select_device(DeviceChoice::Cpu).unwrap();
    }
}

//! Compute device selection (`--device auto|cpu|cuda|cuda:N`) and the start-up report.

use std::str::FromStr;

use tch::Device;

/// What the user asked for on the command line; resolved against the machine by [`DeviceArg::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// The first CUDA device when one is available, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
    /// `gpu`: the first CUDA device, named as the user spelled it in messages.
    Gpu,
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            "gpu" => Ok(DeviceArg::Gpu),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Ok(DeviceArg::Cuda(index)),
                _ => Err(format!(
                    "unknown device `{s}`: expected auto, cpu, cuda or cuda:N (e.g. cuda:1)"
                )),
            },
        }
    }
}

impl DeviceArg {
    /// The flag as the user gave it, for messages: `--device gpu (cuda:0)`, `--device cuda:1`.
    fn flag(self) -> String {
        match self {
            DeviceArg::Auto => "--device auto".into(),
            DeviceArg::Cpu => "--device cpu".into(),
            DeviceArg::Cuda(index) => format!("--device cuda:{index}"),
            DeviceArg::Gpu => "--device gpu (cuda:0)".into(),
        }
    }

    /// The libtorch device to use; an explicit CUDA request fails when no such GPU is visible.
    /// Loads libtorch's CUDA library first unless the CPU is asked for ([`load_cuda`]).
    pub fn resolve(self) -> anyhow::Result<Device> {
        match self {
            DeviceArg::Cpu => {}
            DeviceArg::Auto => {
                if let Err(why) = load_cuda() {
                    tracing::debug!("the CPU for --device auto: {why}");
                }
            }
            DeviceArg::Cuda(_) | DeviceArg::Gpu => {
                if let Err(why) = load_cuda() {
                    anyhow::bail!(
                        "{} was asked for but CUDA cannot be used: {why}; \
                         use --device cpu or auto",
                        self.flag()
                    );
                }
            }
        }
        let available = if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        };
        match self {
            DeviceArg::Auto if available > 0 => Ok(Device::Cuda(0)),
            DeviceArg::Auto | DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Gpu if available > 0 => Ok(Device::Cuda(0)),
            DeviceArg::Cuda(index) if index < available => Ok(Device::Cuda(index)),
            DeviceArg::Cuda(_) | DeviceArg::Gpu => anyhow::bail!(
                "{} was asked for but libtorch sees {available} CUDA device(s); \
                 use --device cpu or auto",
                self.flag()
            ),
        }
    }
}

/// [`load_cuda`]'s outcome, once it has run.
static CUDA_LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// Loads `libtorch_cuda.so` (and with it the CUDA libraries) once per process, where the NVIDIA
/// driver's `libcuda.so.1` is installed. The binaries do not link it: on a machine without a GPU
/// its loading alone costs about 350 MiB of resident memory (cuBLAS, cuDNN, NCCL...; 472 against
/// 125 MiB for libtorch's CPU library alone). Must run before libtorch is first asked about CUDA
/// (`tch::manual_seed` asks too): libtorch settles its CUDA support at that first question.
pub fn load_cuda() -> Result<(), String> {
    CUDA_LOADED
        .get_or_init(|| {
            dlopen("libcuda.so.1", libc::RTLD_LAZY | libc::RTLD_GLOBAL)
                .map_err(|why| format!("no NVIDIA driver ({why})"))?;
            // Found through the binaries' rpath or LD_LIBRARY_PATH, as a linked library would be.
            dlopen("libtorch_cuda.so", libc::RTLD_NOW | libc::RTLD_GLOBAL)
                .map_err(|why| format!("libtorch's CUDA library did not load ({why})"))
        })
        .clone()
}

/// `dlopen`, the library kept loaded for the process's lifetime; `Err` with `dlerror`'s message.
fn dlopen(name: &str, flags: libc::c_int) -> Result<(), String> {
    let name = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: a valid C string; the handle is never closed, so the library stays mapped.
    let handle = unsafe { libc::dlopen(name.as_ptr(), flags) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns null or a C string valid until the next dl* call on this thread.
    let message = unsafe { libc::dlerror() };
    Err(if message.is_null() {
        "unknown error".to_string()
    } else {
        unsafe { std::ffi::CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    })
}

/// The libtorch version this binary was built against (read from the install by build.rs).
pub const LIBTORCH_VERSION: &str = env!("SVF_LIBTORCH_VERSION");

/// `device` as `--device` names it: `cpu`, `cuda:0`.
pub fn name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Warns when `threads` (`--threads`) exceeds the `cores` the process may run on: libtorch's
/// threads then wait for one another (64 threads on 2 cores run about 40× slower).
pub fn warn_oversubscribed(threads: i32, cores: usize) -> Option<String> {
    (threads as usize > cores).then(|| {
        format!(
            "--threads {threads} exceeds the {cores} core(s) this process may use: libtorch's threads will wait for one another and run many times slower; use --threads {cores} or fewer"
        )
    })
}

/// Logs the device, libtorch version and thread count, as every command does at start.
pub fn log_startup(device: Device) {
    tracing::info!(
        device = %name(device),
        libtorch = LIBTORCH_VERSION,
        threads = tch::get_num_threads(),
        cuda_devices = %cuda_devices(),
        "svf {}",
        env!("CARGO_PKG_VERSION")
    );
}

/// The CUDA devices libtorch sees, or why none are counted: with `--device cpu` its CUDA library is
/// never loaded, so "0" would misreport a GPU machine.
fn cuda_devices() -> String {
    match CUDA_LOADED.get() {
        Some(Ok(())) if tch::Cuda::is_available() => tch::Cuda::device_count().to_string(),
        Some(Ok(())) => "0".to_string(),
        Some(Err(why)) => format!("0 ({why})"),
        None => "not looked for (--device cpu)".to_string(),
    }
}

/// Keeps freed host memory in the process for reuse. glibc's malloc returns every block above its
/// mmap threshold to the kernel when it is freed and trims the heap's free top, and libtorch frees
/// and reallocates its activations at every step: each step then faults tens of thousands of fresh
/// zero pages back in (22–32 k per ResNet-50 + SVF train step at 233, none with this setting). With
/// the threshold fixed at glibc's maximum and trimming raised, freed blocks are reused instead.
/// Peak memory is unchanged (what is kept was resident at the peak); `svf-bench` still trims
/// before each measurement. Returns whether glibc took every setting (true off glibc: nothing to do).
pub fn keep_freed_host_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MIB: libc::c_int = 1 << 20;
        let settings = [
            (libc::M_MMAP_THRESHOLD, 32 * MIB),
            (libc::M_TRIM_THRESHOLD, 1024 * MIB),
            (libc::M_TOP_PAD, 64 * MIB),
        ];
        settings.into_iter().all(|(parameter, value)| {
            // SAFETY: mallopt only changes glibc's allocation policy; no memory is touched.
            let accepted = unsafe { libc::mallopt(parameter, value) } == 1;
            if !accepted {
                tracing::debug!("mallopt({parameter}, {value}) refused; glibc's default stays");
            }
            accepted
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse(), Ok(DeviceArg::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceArg::Cuda(3)));
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1", ""] {
            let err = bad.parse::<DeviceArg>().unwrap_err();
            assert!(err.contains("auto, cpu, cuda"), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_and_auto_resolve_without_gpu_requests_failing_clearly() {
        assert_eq!(DeviceArg::Cpu.resolve().unwrap(), Device::Cpu);
        let auto = DeviceArg::Auto.resolve().unwrap();
        assert_eq!(auto.is_cuda(), tch::Cuda::is_available());
        let message = DeviceArg::Cuda(999).resolve().unwrap_err().to_string();
        assert!(message.contains("cuda:999"), "{message}");
    }

    /// `gpu` is echoed as given, with the device it stands for.
    #[test]
    fn gpu_alias_is_named_as_given() {
        assert_eq!("GPU".parse(), Ok(DeviceArg::Gpu));
        match DeviceArg::Gpu.resolve() {
            Ok(device) => assert_eq!(device, Device::Cuda(0)),
            Err(e) => {
                let message = e.to_string();
                assert!(message.starts_with("--device gpu (cuda:0) "), "{message}");
            }
        }
    }

    #[test]
    fn devices_are_named_as_the_flag_names_them() {
        assert_eq!(name(Device::Cpu), "cpu");
        assert_eq!(name(Device::Cuda(1)), "cuda:1");
    }

    #[test]
    fn more_threads_than_cores_are_warned_about() {
        assert_eq!(warn_oversubscribed(2, 2), None);
        let message = warn_oversubscribed(64, 2).unwrap();
        assert!(
            message.contains("--threads 64") && message.contains("2 core"),
            "{message}"
        );
    }

    /// libtorch's CUDA library is in the process exactly where the driver is: not linked (it
    /// would be mapped from the start), loaded by resolving a device that may be a GPU.
    #[cfg(target_os = "linux")]
    #[test]
    fn libtorch_cuda_is_loaded_only_with_a_driver() {
        let mapped = || {
            std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .contains("libtorch_cuda.so")
        };
        let driver = dlopen("libcuda.so.1", libc::RTLD_LAZY).is_ok();
        let _ = DeviceArg::Auto.resolve().unwrap();
        assert_eq!(mapped(), driver, "driver present: {driver}");
        assert_eq!(load_cuda().is_ok(), driver, "{:?}", load_cuda());
    }

    /// Minor page faults of the calling thread so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn thread_page_faults() -> i64 {
        // SAFETY: getrusage writes into the zeroed struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) },
            0
        );
        usage.ru_minflt
    }

    /// A freed 24 MiB block (the size of a layer's activations at 473) comes back without
    /// faulting its pages in again; glibc's default returns it to the kernel (6 k faults here).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_blocks_are_reused_without_page_faults() {
        assert!(keep_freed_host_memory(), "glibc refused a setting");
        std::thread::spawn(|| {
            const SIZE: usize = 24 << 20;
            let touch = || std::hint::black_box(vec![1u8; SIZE]);
            drop(touch());
            let before = thread_page_faults();
            drop(touch());
            let faults = thread_page_faults() - before;
            assert!(
                faults < 600,
                "{faults} page faults reallocating a freed 24 MiB block"
            );
        })
        .join()
        .unwrap();
    }
}

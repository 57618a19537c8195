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
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda(0)),
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
    /// The libtorch device to use; an explicit CUDA request fails when no such GPU is visible.
    pub fn resolve(self) -> anyhow::Result<Device> {
        let available = if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        };
        match self {
            DeviceArg::Auto if available > 0 => Ok(Device::Cuda(0)),
            DeviceArg::Auto | DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(index) if index < available => Ok(Device::Cuda(index)),
            DeviceArg::Cuda(index) => anyhow::bail!(
                "--device cuda:{index} was asked for but libtorch sees {available} CUDA device(s); \
                 use --device cpu or auto"
            ),
        }
    }
}

/// The libtorch version this binary was built against (read from the install by build.rs).
pub const LIBTORCH_VERSION: &str = env!("SVF_LIBTORCH_VERSION");

/// Logs the device, libtorch version and thread count, as every command does at start.
pub fn log_startup(device: Device) {
    let name = match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    tracing::info!(
        device = %name,
        libtorch = LIBTORCH_VERSION,
        threads = tch::get_num_threads(),
        cuda_devices = if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 },
        "svf {}",
        env!("CARGO_PKG_VERSION")
    );
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
}

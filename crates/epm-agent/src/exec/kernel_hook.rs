//! The kernel exec hook's adapter: loads `epm-exec-hook` where the kernel
//! allows it, tells it which file systems fanotify gates, turns each exec
//! it holds into a [`PendingExec`](epm_gate::PendingExec) for the ordinary pipeline, and answers
//! it with a verdict and SIGCONT. Where the hook cannot run, it names each
//! exposure and the setting that closes it, for `epmd --check`,
//! `epmctl status` and the start record. docs/kernel-hook.md is the design.

use std::sync::{Arc, Mutex, PoisonError};

use epm_ipc::{ExposureStatus, KernelHookStatus};

use crate::config::KernelHookConfig;

/// The shared, current state of the hook, for `epmctl status`.
pub type SharedStatus = Arc<Mutex<KernelHookStatus>>;

/// The ways to run a program that fanotify alone does not see, each with
/// what closes it where the hook does not run.
const EXPOSURES: [(&str, &str); 4] = [
    ("memfd", "sysctl vm.memfd_noexec=2"),
    ("user_namespaces", "sysctl user.max_user_namespaces=0"),
    (
        "fuse",
        "chmod 0600 /dev/fuse and chmod u-s /usr/bin/fusermount3 /usr/bin/fusermount /bin/fusermount",
    ),
    (
        "loader",
        "mount every file system users can write (/home, /tmp, /var/tmp, /dev/shm) noexec",
    ),
];

/// Each exposure: `covered` when the hook runs, else whether this
/// machine's settings close it.
pub fn exposures(covered: bool) -> Vec<ExposureStatus> {
    EXPOSURES
        .iter()
        .map(|(name, setting)| ExposureStatus {
            name: (*name).to_owned(),
            state: if covered {
                "covered"
            } else if closed_by_settings(name) {
                "closed"
            } else {
                "open"
            }
            .to_owned(),
            setting: (*setting).to_owned(),
        })
        .collect()
}

fn read_number(path: &str) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether the machine's settings close an exposure without the hook.
fn closed_by_settings(name: &str) -> bool {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match name {
        "memfd" => read_number("/proc/sys/vm/memfd_noexec") == Some(2),
        "user_namespaces" => {
            read_number("/proc/sys/user/max_user_namespaces") == Some(0)
                || read_number("/proc/sys/kernel/unprivileged_userns_clone") == Some(0)
        }
        "fuse" => {
            let device_open =
                std::fs::metadata("/dev/fuse").is_ok_and(|m| m.permissions().mode() & 0o006 != 0);
            let setuid_helper = [
                "/usr/bin/fusermount3",
                "/usr/bin/fusermount",
                "/bin/fusermount3",
                "/bin/fusermount",
            ]
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o4000 != 0));
            !device_open && !setuid_helper
        }
        // No setting stops `ld.so PROGRAM` on an executable mount.
        _ => false,
    }
}

/// The status of a hook that does not run, for `reason`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn not_running(state: &str, reason: String) -> KernelHookStatus {
    KernelHookStatus {
        state: state.to_owned(),
        detail: reason,
        exposures: exposures(false),
        unrecorded_refusals: 0,
    }
}

/// One line per exposure, for logs and `epmd --check`.
pub fn describe(status: &KernelHookStatus) -> Vec<String> {
    let mut lines = vec![format!("kernel hook: {} ({})", status.state, status.detail)];
    for exposure in &status.exposures {
        lines.push(match exposure.state.as_str() {
            "covered" => format!("exposure {}: covered by the kernel hook", exposure.name),
            state => format!(
                "exposure {}: {state}; what closes it without the hook: {}",
                exposure.name, exposure.setting
            ),
        });
    }
    lines
}

/// The hook's details for the `daemon_started` record.
pub fn audit_value(status: &KernelHookStatus) -> serde_json::Value {
    serde_json::json!({
        "state": status.state,
        "detail": status.detail,
        "exposures": status.exposures.iter().map(|e| serde_json::json!({
            "name": e.name, "state": e.state, "setting": e.setting,
        })).collect::<Vec<_>>(),
    })
}

/// The hook, loaded (the verifier has run) but not attached yet, and its
/// status; or only the status of a hook that cannot run.
#[derive(Debug)]
pub struct Prepared {
    #[cfg(target_os = "linux")]
    hook: Option<epm_exec_hook::PreparedHook>,
    /// What `epmctl status` shows.
    pub status: SharedStatus,
}

/// Loads the hook if configured and possible; never fails the daemon.
pub fn prepare(config: &KernelHookConfig) -> Prepared {
    #[cfg(target_os = "linux")]
    {
        if !config.enabled {
            return Prepared {
                hook: None,
                status: Arc::new(Mutex::new(not_running(
                    "disabled",
                    "kernel_hook.enabled = false: fanotify alone gates execs".to_owned(),
                ))),
            };
        }
        let options = epm_exec_hook::HookOptions {
            daemon_tgid: std::process::id(),
            cgroup: config.cgroup.clone(),
            max_held_per_uid: config.max_held_per_uid,
        };
        match epm_exec_hook::PreparedHook::load(&options) {
            Ok(hook) => Prepared {
                hook: Some(hook),
                status: Arc::new(Mutex::new(KernelHookStatus {
                    state: "active".to_owned(),
                    detail: match &config.cgroup {
                        Some(cgroup) => format!(
                            "holding execs in the cgroup {} only (kernel_hook.cgroup)",
                            cgroup.display()
                        ),
                        None => "holding every exec fanotify does not gate".to_owned(),
                    },
                    exposures: exposures(true),
                    unrecorded_refusals: 0,
                })),
            },
            Err(error) => Prepared {
                hook: None,
                status: Arc::new(Mutex::new(not_running(
                    "unavailable",
                    format!("{error}; fanotify alone gates execs"),
                ))),
            },
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = config;
        Prepared {
            status: Arc::new(Mutex::new(KernelHookStatus {
                state: "not_needed".to_owned(),
                detail: "Endpoint Security sees every exec".to_owned(),
                exposures: Vec::new(),
                unrecorded_refusals: 0,
            })),
        }
    }
}

/// A copy of the status now.
pub fn snapshot(status: &SharedStatus) -> KernelHookStatus {
    status
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

#[cfg(target_os = "linux")]
pub use linux::{Running, start};

#[cfg(target_os = "linux")]
mod linux;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exposure_names_what_closes_it() {
        let open = exposures(false);
        assert_eq!(
            open.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["memfd", "user_namespaces", "fuse", "loader"]
        );
        for exposure in &open {
            assert!(["open", "closed"].contains(&exposure.state.as_str()));
            assert!(!exposure.setting.is_empty());
        }
        assert_eq!(
            open.iter().find(|e| e.name == "loader").unwrap().state,
            "open"
        );
        assert!(exposures(true).iter().all(|e| e.state == "covered"));
        let status = not_running("disabled", "off".into());
        let lines = describe(&status);
        assert!(lines[0].contains("disabled"));
        assert!(lines.iter().any(|l| l.contains("vm.memfd_noexec=2")));
        assert_eq!(audit_value(&status)["exposures"][0]["name"], "memfd");
    }
}

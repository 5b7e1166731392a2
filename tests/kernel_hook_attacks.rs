//! The ways to run a program that fanotify cannot see, tried as a throwaway
//! standard user against a real epmd with the kernel exec hook: a memfd
//! (exec of /proc/self/fd/N and fexecve), a private mount namespace, a user
//! FUSE mount, and the loader run directly. Each test scopes the hook to a
//! cgroup of its own, so other processes on the machine are never held.
//!
//! Where the kernel refuses the hook (no BPF LSM, or a kernel that does not
//! let root load LSM programs), each test checks instead that the start
//! record, `epmctl status` and `epmd --check` name the exposure with the
//! setting that closes it. `EPM_E2E_REQUIRE_KERNEL_HOOK=1` makes a missing
//! hook a failure (set it where the kernel has one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use epm_e2e::{Daemon, TestUser, binary, capable, policy, sha256_of};

/// A cgroup (v2) of this test's own, removed on drop.
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn create(name: &str) -> Cgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = mountinfo
            .lines()
            .find(|l| l.contains(" - cgroup2 "))
            .and_then(|l| l.split_whitespace().nth(4))
            .expect("a cgroup2 mount");
        let path = Path::new(root).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).unwrap();
        Cgroup { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes have exited; a cgroup dir is removed with rmdir.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// One attack's setting: a daemon with the hook scoped to a cgroup, a user,
/// and a denied and an allowed program (copies of `true` made unique).
struct Setup {
    daemon: Daemon,
    cgroup: Cgroup,
    user: TestUser,
    work: tempfile::TempDir,
    denied: PathBuf,
    allowed: PathBuf,
    denied_sha: String,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let cgroup = Cgroup::create(name);
        let user = TestUser::create(name);
        let work = tempfile::Builder::new().prefix("epk-").tempdir().unwrap();
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let program = |file: &str, marker: &[u8]| {
            let path = work.path().join(file);
            let mut bytes = std::fs::read("/usr/bin/true").unwrap();
            bytes.extend_from_slice(marker);
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let denied = program("denied-tool", b"epk denied");
        let allowed = program("allowed-tool", b"epk allowed");
        let denied_sha = sha256_of(&denied);
        let document = policy(
            1,
            "allow",
            &[format!(
                r#"{{"id": "blocked", "action": "deny", "match": {{"sha256": "{denied_sha}"}}}}"#
            )],
        );
        let daemon = Daemon::start_with_tables(
            &document,
            &format!(
                "[kernel_hook]\ncgroup = {:?}\n",
                cgroup.path.display().to_string()
            ),
        );
        daemon.open_to_users();
        Setup {
            daemon,
            cgroup,
            user,
            work,
            denied,
            allowed,
            denied_sha,
        }
    }

    /// Whether the hook runs; when it does not, fails under
    /// `EPM_E2E_REQUIRE_KERNEL_HOOK=1`.
    fn hook_active(&self) -> bool {
        let status = self.daemon.status();
        let state = status["kernel_hook"]["state"].as_str().unwrap_or_default();
        if state == "active" {
            return true;
        }
        let why = status["kernel_hook"]["detail"].to_string();
        assert!(
            std::env::var("EPM_E2E_REQUIRE_KERNEL_HOOK").as_deref() != Ok("1"),
            "EPM_E2E_REQUIRE_KERNEL_HOOK=1 but the kernel hook is {state}: {why}"
        );
        eprintln!("the kernel hook is {state} here ({why}): checking the exposure is reported");
        false
    }

    /// Runs `script` with sh as the test user, inside the hook's cgroup.
    fn run_as_user(&self, script: &str) -> Output {
        let procs = self.cgroup.path.join("cgroup.procs");
        let wrapper = format!(
            "echo $$ > {procs:?} && exec setpriv --reuid={uid} --regid={gid} --clear-groups \
             --reset-env sh -c {script:?}",
            uid = self.user.uid,
            gid = self.user.gid,
        );
        let mut child = Command::new("sh")
            .args(["-c", &wrapper])
            .current_dir(self.work.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the attack hung: {script}\n{}",
                self.daemon.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// The exposure as the start record, `epmctl status` and
    /// `epmd --check` name it: not covered, with a setting that closes it.
    fn assert_exposure_reported(&self, name: &str, setting: &str) {
        let started = self
            .daemon
            .wait_for_record("daemon_started", |r| r["event"] == "daemon_started");
        let exposures = &started["details"]["kernel_hook"]["exposures"];
        let in_record = exposures
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in the start record: {started}"));
        assert_ne!(in_record["state"], "covered", "{started}");
        assert!(
            in_record["setting"].as_str().unwrap().contains(setting),
            "{in_record}"
        );
        let status = self.daemon.status();
        let in_status = status["kernel_hook"]["exposures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap();
        assert_eq!(in_status["setting"], in_record["setting"]);
        let text = self.daemon.epmctl(&["status"]);
        assert!(
            String::from_utf8_lossy(&text.stdout).contains(&format!("exposure:    {name}:")),
            "{}",
            String::from_utf8_lossy(&text.stdout)
        );
        let check = check_output(&self.daemon);
        assert!(
            check.contains(&format!("exposure {name}:")) && check.contains(setting),
            "{check}"
        );
    }

    /// The record of a refused exec of the denied program.
    fn wait_for_refusal(&self) -> serde_json::Value {
        self.daemon.wait_for_record("of the refused exec", |r| {
            r["event"] == "exec"
                && r["decision"] == "deny"
                && r["uid"] == self.user.uid
                && (r["sha256"] == self.denied_sha.as_str()
                    || r["details"]["answered_by"] == "kernel_hook")
        })
    }
}

/// `epmd --check` on the daemon's own configuration.
fn check_output(daemon: &Daemon) -> String {
    let config = daemon.state_dir().parent().unwrap().join("epmd.toml");
    let out = Command::new(binary("epmd"))
        .arg("--check")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn memfd_exec(setup: &Setup, program: &Path, how: &str, seal: &str) -> Output {
    let helper = binary("epm-e2e-memfd-exec");
    setup.run_as_user(&format!(
        "{} {} {how} {seal}",
        helper.display(),
        program.display()
    ))
}

#[test]
fn a_denied_program_in_a_memfd_is_refused_and_an_allowed_one_runs() {
    if !capable() {
        return;
    }
    let setup = Setup::new("epk-memfd");
    if !setup.hook_active() {
        setup.assert_exposure_reported("memfd", "vm.memfd_noexec=2");
        return;
    }
    for how in ["path", "fexecve"] {
        let refused = memfd_exec(&setup, &setup.denied, how, "sealed");
        assert!(!refused.status.success(), "{how}: the denied program ran");
        let record = setup.wait_for_refusal();
        assert_eq!(record["details"]["path_origin"], "anonymous", "{record}");
        let ran = memfd_exec(&setup, &setup.allowed, how, "sealed");
        assert!(
            ran.status.success(),
            "{how}: the allowed program did not run: {}",
            String::from_utf8_lossy(&ran.stderr)
        );
        let allowed_sha = sha256_of(&setup.allowed);
        setup
            .daemon
            .wait_for_record("of the allowed memfd exec", |r| {
                r["event"] == "exec"
                    && r["decision"] == "allow"
                    && r["sha256"] == allowed_sha.as_str()
            });
    }
    // Still writable after the decision: its content is not what was
    // decided, and the policy denies by content.
    let writable = memfd_exec(&setup, &setup.allowed, "fexecve", "writable");
    assert!(!writable.status.success(), "an unsealed memfd ran");
}

#[test]
fn a_denied_program_in_a_private_mount_namespace_is_refused() {
    if !capable() {
        return;
    }
    let setup = Setup::new("epk-userns");
    if !setup.hook_active() {
        setup.assert_exposure_reported("user_namespaces", "user.max_user_namespaces=0");
        return;
    }
    let out = setup.run_as_user(&format!(
        "unshare -Urm sh -c 'mount -t tmpfs epk /mnt && cp {} /mnt/tool && /mnt/tool'",
        setup.denied.display()
    ));
    assert!(
        !out.status.success(),
        "the denied program ran in a private mount"
    );
    let record = setup.wait_for_refusal();
    assert_eq!(
        record["details"]["path_origin"], "other_mount_namespace",
        "{record}"
    );
}

#[test]
fn a_denied_program_on_a_user_fuse_mount_is_refused() {
    if !capable() {
        return;
    }
    let setup = Setup::new("epk-fuse");
    if !setup.hook_active() {
        setup.assert_exposure_reported("fuse", "/dev/fuse");
        return;
    }
    let out = setup.run_as_user(&format!(
        "mkdir -p lower upper work merged && cp {} lower/tool && \
         fuse-overlayfs -o lowerdir=lower,upperdir=upper,workdir=work merged && \
         (./merged/tool; rc=$?; fusermount3 -u merged; exit $rc)",
        setup.denied.display()
    ));
    assert!(!out.status.success(), "the denied program ran from FUSE");
    setup.wait_for_refusal();
}

#[test]
fn a_denied_program_run_by_the_loader_is_refused() {
    if !capable() {
        return;
    }
    let setup = Setup::new("epk-loader");
    if !setup.hook_active() {
        setup.assert_exposure_reported("loader", "noexec");
        return;
    }
    let out = setup.run_as_user(&format!(
        "/lib64/ld-linux-x86-64.so.2 {}",
        setup.denied.display()
    ));
    assert!(!out.status.success(), "ld.so ran the denied program");
    setup.wait_for_refusal();
    let ran = setup.run_as_user(&format!(
        "/lib64/ld-linux-x86-64.so.2 {}",
        setup.allowed.display()
    ));
    assert!(
        ran.status.success(),
        "ld.so did not run the allowed program"
    );
}

#[test]
fn with_the_hook_off_every_exposure_is_named_where_an_admin_looks() {
    if !capable() {
        return;
    }
    // The support's default: [kernel_hook] enabled = false.
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let status = daemon.status();
    assert_eq!(status["kernel_hook"]["state"], "disabled", "{status}");
    let started = daemon.wait_for_record("daemon_started", |r| r["event"] == "daemon_started");
    let check = check_output(&daemon);
    assert!(check.contains("kernel hook: disabled"), "{check}");
    for (name, setting) in [
        ("memfd", "vm.memfd_noexec=2"),
        ("user_namespaces", "user.max_user_namespaces=0"),
        ("fuse", "/dev/fuse"),
        ("loader", "noexec"),
    ] {
        for exposures in [
            &started["details"]["kernel_hook"]["exposures"],
            &status["kernel_hook"]["exposures"],
        ] {
            let exposure = exposures
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("{name} missing: {exposures}"));
            assert!(["open", "closed"].contains(&exposure["state"].as_str().unwrap()));
            assert!(exposure["setting"].as_str().unwrap().contains(setting));
        }
        assert!(check.contains(&format!("exposure {name}:")), "{check}");
    }
}

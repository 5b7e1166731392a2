//! `epmctl policy explain`: decide one executable against a policy file and
//! say why, the way the daemon would.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use epm_ipc::{Endpoint, Explanation};
use epm_os::users::Account;
use epm_policy::{CdHash, Decision, Engine, Sha256Digest, Subject};
use sha2::{Digest, Sha256};

#[derive(Debug, Args)]
pub(crate) struct ExplainArgs {
    /// Decide with this policy document instead of the daemon's live policy.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Decide as this user (default: you).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Decide with these groups, comma-separated (default: the user's groups).
    #[arg(long, value_name = "G1,G2", value_delimiter = ',')]
    groups: Option<Vec<String>>,
    /// Decide on this device id (default: this host's name).
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// The executable to decide on; it is read and hashed.
    path: PathBuf,
}

pub(crate) fn run(args: &ExplainArgs, endpoint: &Endpoint, json: bool) -> anyhow::Result<ExitCode> {
    let Some(policy) = &args.policy else {
        // The daemon decides; we read and hash the file, with our own rights.
        let subject = local_subject(args)?;
        return crate::daemon_cmd::policy_explain(
            endpoint,
            Path::new(&subject.path),
            subject.sha256.map(|d| d.to_string()),
            args.user.clone(),
            args.groups.clone(),
            json,
        );
    };
    let text = std::fs::read_to_string(policy)
        .with_context(|| format!("cannot read policy {}", policy.display()))?;
    let engine = match Engine::from_json(&text) {
        Ok(engine) => engine,
        Err(errors) => bail!(
            "{} is not a valid policy (run `epmctl policy check {0}`):\n{errors}",
            policy.display()
        ),
    };
    let subject = local_subject(args)?;
    let decision = engine.evaluate(&subject);
    let label = format!("from {}", policy.display());
    print_explanation(
        Path::new(&subject.path),
        &explanation(&subject, &decision),
        &label,
        json,
    );
    Ok(ExitCode::SUCCESS)
}

/// Fills a subject the way the exec gate would: path, SHA-256 and (on macOS)
/// what its code signature proves, from the file; user, groups and device
/// from the arguments or this machine.
fn local_subject(args: &ExplainArgs) -> anyhow::Result<Subject> {
    let path = std::path::absolute(&args.path)
        .with_context(|| format!("cannot resolve {}", args.path.display()))?;
    // The gate sees the file the kernel opens, i.e. after symlinks.
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    let file =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let sha256 = hash_file(&path, &file)?;
    // What the macOS exec gate would see of its signature (nothing elsewhere).
    let signature = epm_os::signature::of_file(&path, &file)
        .with_context(|| format!("cannot read the signature of {}", path.display()))?;
    let proven = signature
        .as_ref()
        .map(epm_os::signature::CodeSignature::proven)
        .unwrap_or_default();

    let user = match &args.user {
        Some(name) => Account::by_name(name),
        None => Account::by_uid(nix::unistd::getuid().as_raw()),
    };
    let user_name = args
        .user
        .clone()
        .or_else(|| user.as_ref().map(|u| u.name.clone()))
        .unwrap_or_default();
    let groups = match &args.groups {
        Some(groups) => groups.clone(),
        None => user.as_ref().map(Account::group_names).unwrap_or_default(),
    };
    let device_id = match &args.device {
        Some(device) => device.clone(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
    };
    Ok(Subject {
        path: path.to_string_lossy().into_owned(),
        sha256: Some(sha256),
        cdhash: proven.cdhash.map(CdHash),
        team_id: proven.team_id,
        signing_id: proven.signing_id,
        platform_binary: signature.map(|s| s.platform_binary),
        uid: user.as_ref().map_or(u32::MAX, |u| u.uid),
        user: user_name,
        groups,
        device_id,
        ..Subject::default()
    })
}

fn hash_file(path: &Path, mut file: &std::fs::File) -> anyhow::Result<Sha256Digest> {
    if !file.metadata()?.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}

/// The explanation of a local decision, in the same shape the daemon sends.
fn explanation(subject: &Subject, decision: &Decision) -> Explanation {
    Explanation {
        action: decision.action.as_str().to_owned(),
        rule_id: decision.rule_id.as_deref().map(str::to_owned),
        reason: decision.reason(),
        criterion: decision.criterion.map(|c| c.as_str().to_owned()),
        scope: decision.scope.map(|s| s.as_str().to_owned()),
        message: decision.message.as_deref().map(str::to_owned),
        policy_version: decision.policy_version,
        sha256: subject.sha256.map(|d| d.to_string()),
        user: subject.user.clone(),
        groups: subject.groups.clone(),
        device_id: subject.device_id.clone(),
    }
}

/// Prints a decision and why, the same way whether the policy was a local
/// file or the daemon's live one.
pub(crate) fn print_explanation(path: &Path, e: &Explanation, policy_label: &str, json: bool) {
    if json {
        match serde_json::to_string(e) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("epmctl: {error}"),
        }
        return;
    }
    println!("{}  {}", e.action, path.display());
    println!("  why:     {}", e.reason);
    if let Some(message) = &e.message {
        println!("  message: {message}");
    }
    println!("  policy:  version {} ({policy_label})", e.policy_version);
    if let Some(sha256) = &e.sha256 {
        println!("  sha256:  {sha256}");
    }
    println!(
        "  as:      user {:?}, groups [{}], device {:?}",
        e.user,
        e.groups.join(", "),
        e.device_id
    );
}

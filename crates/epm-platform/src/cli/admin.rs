//! `epm-platform admin`: admin accounts, over the API or (offline, with
//! `--data` alone) on the database directly.

use clap::Subcommand;
use epm_api::admin::{AdminCreated, AdminInfo, AdminRole, CreateAdmin, SetPassword, UpdateAdmin};
use epm_api::paths;
use epm_platform::db::Actor;

use super::{Failure, Remote, client, data_dir, encode, line, open_db, other, print_json};

#[derive(Debug, Subcommand)]
pub(super) enum AdminCommand {
    /// Create an admin and print its token (shown once); owners only. With
    /// --data and no server needed, this makes the first admin, the owner.
    Create {
        /// Unique name.
        #[arg(long)]
        name: String,
        /// owner, policy_admin, approver or auditor (default: approver with
        /// --approver-level, else auditor; the first admin is the owner).
        #[arg(long)]
        role: Option<AdminRole>,
        /// The approval level this admin approves at (1 = first level; at
        /// most the highest level a stored rule has).
        #[arg(long)]
        approver_level: Option<u32>,
        /// An endpoint login name that is this admin (repeat; default: the
        /// admin's name). Nobody approves a request of their own user.
        #[arg(long = "endpoint-user")]
        endpoint_users: Vec<String>,
        /// Read a console password for the new admin from stdin (one line).
        #[arg(long)]
        password_stdin: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set an admin's password for the web console, read from stdin (one
    /// line, 12 to 1024 bytes); the owner sets anyone's, every admin their
    /// own. Ends the admin's console sessions. With --data and no token,
    /// works on the database directly.
    #[command(name = "set-password")]
    SetPassword {
        /// The admin.
        #[arg(long)]
        name: String,
    },
    /// Turn on TOTP (an authenticator app's six-digit codes, RFC 6238) for
    /// an admin's console sign-in, or off with --off. Works on --data, on
    /// the server: prints the secret and the otpauth:// URI once.
    Totp {
        /// The admin.
        #[arg(long)]
        name: String,
        /// Turn it off.
        #[arg(long)]
        off: bool,
    },
    /// List admins.
    List {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Change an admin's role, level or endpoint users (owner only; what is
    /// not given stays).
    Update {
        /// The admin.
        name: String,
        /// The new role.
        #[arg(long)]
        role: Option<AdminRole>,
        /// The new approval level.
        #[arg(long, conflicts_with = "no_approver_level")]
        approver_level: Option<u32>,
        /// No approval level any more.
        #[arg(long)]
        no_approver_level: bool,
        /// The endpoint login names that are this admin (repeat; replaces
        /// the list).
        #[arg(long = "endpoint-user")]
        endpoint_users: Vec<String>,
    },
    /// Refuse an admin's token from now on (owner only).
    Disable {
        /// The admin.
        name: String,
    },
    /// Accept a disabled admin's token again (owner only).
    Enable {
        /// The admin.
        name: String,
    },
    /// Give an admin a new token and refuse the old one (the owner for
    /// anyone, every admin for themselves). Prints the token, shown once.
    #[command(name = "rotate-token")]
    RotateToken {
        /// The admin.
        name: String,
    },
}

/// Runs one `admin` command.
pub(super) async fn run(remote: &Remote, command: AdminCommand) -> Result<(), Failure> {
    match command {
        AdminCommand::Create {
            name,
            role,
            approver_level,
            endpoint_users,
            password_stdin,
            json,
        } => {
            let request = CreateAdmin {
                name,
                role,
                approver_level,
                endpoint_users: (!endpoint_users.is_empty()).then_some(endpoint_users),
            };
            create(remote, request, password_stdin, json).await
        }
        AdminCommand::SetPassword { name } => {
            let password = read_password()?;
            set_password(remote, &name, password).await?;
            eprintln!("the console password of {name} is set; its console sessions ended");
            Ok(())
        }
        AdminCommand::Totp { name, off } => totp(remote, &name, off),
        AdminCommand::List { json } => {
            let admins: Vec<AdminInfo> = client(remote)?.get(paths::ADMIN_ADMINS).await?;
            for a in &admins {
                if json {
                    print_json(a)?;
                } else {
                    println!("{}", describe(a));
                }
            }
            Ok(())
        }
        AdminCommand::Update {
            name,
            role,
            approver_level,
            no_approver_level,
            endpoint_users,
        } => {
            let approver_level = match (approver_level, no_approver_level) {
                (Some(level), _) => Change::To(Some(level)),
                (None, true) => Change::To(None),
                (None, false) => Change::Keep,
            };
            update(remote, &name, role, approver_level, endpoint_users).await
        }
        AdminCommand::Disable { name } => {
            set_disabled(remote, &name, paths::ADMIN_ADMIN_DISABLE).await
        }
        AdminCommand::Enable { name } => {
            set_disabled(remote, &name, paths::ADMIN_ADMIN_ENABLE).await
        }
        AdminCommand::RotateToken { name } => {
            let created: AdminCreated = client(remote)?
                .post(
                    &paths::ADMIN_ADMIN_ROTATE_TOKEN.replace("{name}", &encode(&name)),
                    &serde_json::json!({}),
                )
                .await?;
            println!("{}", created.token);
            eprintln!(
                "a new token for {}, shown once; the old one is refused from now on",
                created.admin.name
            );
            Ok(())
        }
    }
}

/// `admin create`: over the API, or offline into the database (so the
/// first admin can be made); then its password, if asked for.
async fn create(
    remote: &Remote,
    request: CreateAdmin,
    password_stdin: bool,
    json: bool,
) -> Result<(), Failure> {
    let password = password_stdin.then(read_password).transpose()?;
    let created: AdminCreated = if offline(remote) {
        // Offline: straight into the database, so the first admin can
        // be made. Whoever can write the data directory owns the
        // platform anyway.
        use epm_api::validate::Validate;
        request
            .validate()
            .map_err(|e| Failure::Refused(e.to_string()))?;
        let data = data_dir(remote)?;
        let db = open_db(remote, &data)?;
        let (created, detail) = db
            .create_admin(Actor::Local, &request)
            .map_err(|e| Failure::Refused(e.to_string()))?;
        db.record_activity("local", "admin create (offline)", 200, Some(&detail))
            .map_err(other)?;
        created
    } else {
        client(remote)?.post(paths::ADMIN_ADMINS, &request).await?
    };
    if let Some(password) = password {
        set_password(remote, &created.admin.name, password).await?;
    }
    if json {
        return print_json(&created);
    }
    println!("{}", created.token);
    eprintln!(
        "admin {} created, {}{}; the token above is shown once: export EPM_ADMIN_TOKEN=<token>",
        created.admin.name,
        created.admin.role,
        created
            .admin
            .approver_level
            .map(|l| format!(", approves at level {l}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// `admin totp`: on the database (`--data`), so the secret never
/// crosses the network.
fn totp(remote: &Remote, name: &str, off: bool) -> Result<(), Failure> {
    let data = data_dir(remote)?;
    let db = open_db(remote, &data)?;
    let secret = (!off).then(epm_platform::console::auth::new_totp_secret);
    db.set_totp(None, name, secret.as_deref())
        .map_err(|e| Failure::Refused(e.to_string()))?;
    let detail = if off {
        format!("turned TOTP off for admin {name}")
    } else {
        format!("turned TOTP on for admin {name}")
    };
    db.record_activity("local", "admin totp (offline)", 200, Some(&detail))
        .map_err(other)?;
    match secret {
        Some(secret) => {
            println!("{}", epm_platform::console::auth::totp_uri(&secret, name));
            eprintln!(
                "TOTP is on for {name}: add the URI above (or the secret {secret}) to an authenticator app; it is shown once. Console sign-ins now need its six-digit code"
            );
        }
        None => eprintln!("TOTP is off for {name}"),
    }
    Ok(())
}

/// A field `admin update` changes, or keeps as it is.
enum Change<T> {
    Keep,
    To(T),
}

/// `admin update`: what is not given stays as the platform has it.
async fn update(
    remote: &Remote,
    name: &str,
    role: Option<AdminRole>,
    approver_level: Change<Option<u32>>,
    endpoint_users: Vec<String>,
) -> Result<(), Failure> {
    let client = client(remote)?;
    let admins: Vec<AdminInfo> = client.get(paths::ADMIN_ADMINS).await?;
    let current = admins
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| Failure::Refused(format!("no admin {name:?}")))?;
    let update = UpdateAdmin {
        role: role.unwrap_or(current.role),
        approver_level: match approver_level {
            Change::To(level) => level,
            Change::Keep => current.approver_level,
        },
        endpoint_users: if endpoint_users.is_empty() {
            current.endpoint_users
        } else {
            endpoint_users
        },
    };
    let after: AdminInfo = client
        .put(
            &paths::ADMIN_ADMIN.replace("{name}", &encode(name)),
            &update,
        )
        .await?;
    println!("{}", describe(&after));
    Ok(())
}

fn describe(admin: &AdminInfo) -> String {
    format!(
        "{}\t{}\t{}\tendpoint users: {}{}",
        line(&admin.name),
        admin.role,
        admin
            .approver_level
            .map_or("-".into(), |l| format!("level {l}")),
        line(&admin.endpoint_users.join(", ")),
        if admin.disabled { "\tdisabled" } else { "" }
    )
}

/// Whether an admin command works on the database directly: `--data`
/// given, and neither `--ca` nor a token (whoever can write the data
/// directory owns the platform anyway).
fn offline(remote: &Remote) -> bool {
    remote.data.is_some() && remote.ca.is_none() && std::env::var_os("EPM_ADMIN_TOKEN").is_none()
}

/// One line from stdin: the password (the line break is not part of it).
fn read_password() -> Result<String, Failure> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| other(format!("cannot read the password from stdin: {e}")))?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password).to_owned();
    epm_platform::console::auth::check_new_password(&password).map_err(Failure::Refused)?;
    Ok(password)
}

/// Sets `name`'s console password: on the database with `--data` alone,
/// else over the API.
async fn set_password(remote: &Remote, name: &str, password: String) -> Result<(), Failure> {
    if offline(remote) {
        let data = data_dir(remote)?;
        let phc =
            epm_platform::console::auth::hash_password(&password).map_err(Failure::Refused)?;
        let db = open_db(remote, &data)?;
        db.set_password(None, name, &phc, None)
            .map_err(|e| Failure::Refused(e.to_string()))?;
        db.record_activity(
            "local",
            "admin set-password (offline)",
            200,
            Some(&format!("set the console password of admin {name}")),
        )
        .map_err(other)?;
        return Ok(());
    }
    client(remote)?
        .put_no_content(
            &paths::ADMIN_ADMIN_PASSWORD.replace("{name}", &encode(name)),
            &SetPassword { password },
        )
        .await?;
    Ok(())
}

/// `admin disable` or `admin enable` (`route`).
async fn set_disabled(remote: &Remote, name: &str, route: &str) -> Result<(), Failure> {
    let after: AdminInfo = client(remote)?
        .post(
            &route.replace("{name}", &encode(name)),
            &serde_json::json!({}),
        )
        .await?;
    println!("{}", describe(&after));
    Ok(())
}

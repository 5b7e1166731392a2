//! `epm-platform signing-key`: rotating the key that signs bundles and
//! grants, on the data directory (offline).

use clap::Subcommand;

use super::{Failure, Remote, data_dir, other};

pub(super) const ROTATION_HELP: &str = "A rotation, step by step:\n  \
    1. epm-platform --data DIR signing-key next\n     \
       makes the next key beside the one in use, and prints its public key.\n  \
    2. Give every agent both keys: policy_public_key = [\"<current>\", \"<next>\"]\n     \
       (epmd.toml, or an array in the com.epm.agent managed preferences).\n  \
    3. epm-platform --data DIR signing-key promote, then restart the server:\n     \
       bundles are signed anew with the next key as agents check in.\n  \
    4. Once every agent has checked in and grants signed before have expired,\n     \
       give agents only the new key.";

#[derive(Debug, Subcommand)]
pub(super) enum SigningKeyCommand {
    /// Print the key in use and the next one, if one is waiting.
    Show,
    /// Make the next key (step 1 of a rotation).
    Next,
    /// Put the next key in use, keeping the old one as
    /// signing-key-retired-<time>.pem (step 3; restart the server after).
    Promote,
}

pub(super) fn run(remote: &Remote, command: SigningKeyCommand) -> Result<(), Failure> {
    let data = data_dir(remote)?;
    match command {
        SigningKeyCommand::Show => {
            println!(
                "in use: {}",
                data.signing_key().map_err(other)?.public_key()
            );
            match data.next_signing_key().map_err(other)? {
                Some(next) => println!("next:   {}", next.public_key()),
                None => println!("next:   none (make one with: signing-key next)"),
            }
        }
        SigningKeyCommand::Next => {
            let current = data.signing_key().map_err(other)?.public_key();
            let next = data.make_next_signing_key().map_err(other)?.public_key();
            println!("{next}");
            eprintln!(
                "made the next signing key. Give every agent both keys:\n  policy_public_key = [\"{current}\", \"{next}\"]\nthen run: epm-platform signing-key promote, and restart the server"
            );
        }
        SigningKeyCommand::Promote => {
            let (retired, current) = data.promote_next_signing_key().map_err(other)?;
            println!("{}", current.public_key());
            eprintln!(
                "the next key is in use from the server's next start: restart it. Agents must already pin it (policy_public_key), or they refuse its bundles. Once every agent has checked in and older grants have expired, agents may drop {}",
                retired.public_key()
            );
        }
    }
    Ok(())
}

//! The one [`Subject`] for a program a caller names (`epmctl justify`,
//! `request`) and for a user with no program (admin sessions, `policy
//! explain`'s user part).
//!
//! An exec's subject is built by the decider from what its gate saw. A
//! program named by path has no exec yet, so its subject must say what the
//! exec will present, or a grant made for it is never used: on macOS,
//! Endpoint Security asks for a signed program's grant by cdhash and
//! matches rules on its team and signing ids, so the named file's
//! signature is read ([`epm_os::signature`]) and proven by the same rule the
//! ES gate applies. Elsewhere there is no signature and the grant binds the
//! SHA-256, as an exec's does.

use epm_os::signature::CodeSignature;
use epm_policy::{CdHash, Sha256Digest, Subject};

use crate::grants::program::Program;

/// Who asks, as the policy sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Asker {
    /// User id.
    pub uid: u32,
    /// User name.
    pub user: String,
    /// Group names, primary first.
    pub groups: Vec<String>,
    /// This device.
    pub device_id: String,
}

/// The subject of a user with no program.
pub(crate) fn of_user(asker: Asker) -> Subject {
    Subject {
        uid: asker.uid,
        user: asker.user,
        groups: asker.groups,
        device_id: asker.device_id,
        ..Subject::default()
    }
}

/// The subject of the file at canonical `path` with content `sha256` and
/// code `signature` (if it has one), named by `asker`. Only what the
/// signature proves ([`CodeSignature::proven`]) is used.
pub(crate) fn of_file(
    path: String,
    sha256: Sha256Digest,
    signature: Option<&CodeSignature>,
    asker: Asker,
) -> Subject {
    let proven = signature.map(CodeSignature::proven).unwrap_or_default();
    Subject {
        path,
        sha256: Some(sha256),
        cdhash: proven.cdhash.map(CdHash),
        team_id: proven.team_id,
        signing_id: proven.signing_id,
        platform_binary: signature.map(|s| s.platform_binary),
        ..of_user(asker)
    }
}

/// [`of_file`] for a program opened once ([`Program`]): its canonical path,
/// its hash and the signature of that same file.
pub(crate) fn of_program(program: &Program, asker: Asker) -> std::io::Result<Subject> {
    let signature =
        epm_os::signature::of_file(std::path::Path::new(&program.canonical), &program.file)?;
    Ok(of_file(
        program.canonical.clone(),
        program.sha256,
        signature.as_ref(),
        asker,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::decider::grant_identity;
    use crate::gate::es_map::{CS_SIGNED, CS_VALID, EsExecInfo, exec_facts};
    use epm_store::{IdentityKind, SubjectIdentity};

    fn asker() -> Asker {
        Asker {
            uid: 502,
            user: "alice".into(),
            groups: vec!["staff".into()],
            device_id: "mac-1".into(),
        }
    }

    fn wireshark() -> CodeSignature {
        CodeSignature {
            cdhash: [0xab; 20],
            team_id: "7Z6EMTD2C6".into(),
            signing_id: "org.wireshark.Wireshark".into(),
            valid: true,
            adhoc: false,
            platform_binary: false,
        }
    }

    const PATH: &str = "/Applications/Wireshark.app/Contents/MacOS/Wireshark";

    /// The identity the decider binds an exec's grant to: the subject it
    /// builds carries the exec's cdhash ([`exec_facts`]).
    fn es_exec_identity(signature: &CodeSignature) -> Option<SubjectIdentity> {
        let mut exec = EsExecInfo::default();
        exec.target.executable.path = PATH.into();
        exec.target.cdhash = signature.cdhash;
        exec.target.codesigning_flags = CS_VALID | CS_SIGNED;
        exec.target.team_id = signature.team_id.clone();
        exec.target.signing_id = signature.signing_id.clone();
        let facts = exec_facts(&exec);
        grant_identity(&Subject {
            cdhash: facts.cdhash,
            team_id: facts.team_id,
            signing_id: facts.signing_id,
            sha256: Some(Sha256Digest([7; 32])),
            ..Subject::default()
        })
    }

    #[test]
    fn a_path_named_grant_for_a_signed_program_binds_the_cdhash_es_presents() {
        let signature = wireshark();
        let named = of_file(
            PATH.into(),
            Sha256Digest([7; 32]),
            Some(&signature),
            asker(),
        );
        let identity = grant_identity(&named).unwrap();
        assert_eq!(identity.kind, IdentityKind::Cdhash);
        assert_eq!(Some(identity), es_exec_identity(&signature));
        // Rules on the team and signing ids see what ES would show.
        assert_eq!(named.team_id.as_deref(), Some("7Z6EMTD2C6"));
        assert_eq!(named.signing_id.as_deref(), Some("org.wireshark.Wireshark"));
        assert_eq!(named.platform_binary, Some(false));
    }

    #[test]
    fn an_unsigned_or_invalid_program_binds_its_sha256() {
        let invalid = CodeSignature {
            valid: false,
            ..wireshark()
        };
        for signature in [None, Some(&invalid)] {
            let named = of_file(PATH.into(), Sha256Digest([7; 32]), signature, asker());
            let identity = grant_identity(&named).unwrap();
            assert_eq!(identity.kind, IdentityKind::Sha256);
            assert_eq!(identity.value, Sha256Digest([7; 32]).to_string());
            assert_eq!((named.team_id, named.signing_id), (None, None));
        }
    }

    #[test]
    fn an_ad_hoc_signed_program_binds_its_cdhash_but_claims_no_identity() {
        let adhoc = CodeSignature {
            adhoc: true,
            ..wireshark()
        };
        let named = of_file(PATH.into(), Sha256Digest([7; 32]), Some(&adhoc), asker());
        assert_eq!(grant_identity(&named).unwrap().kind, IdentityKind::Cdhash);
        assert_eq!((named.team_id, named.signing_id), (None, None));
    }

    #[test]
    fn the_asker_is_carried_whole() {
        let user = of_user(asker());
        assert_eq!(
            (user.uid, user.user.as_str(), user.device_id.as_str()),
            (502, "alice", "mac-1")
        );
        assert_eq!(user.groups, ["staff"]);
        assert_eq!(user.sha256, None);
    }
}

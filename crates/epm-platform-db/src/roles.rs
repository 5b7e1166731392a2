//! Who may do what. Every admin has one [`AdminRole`]; every admin call
//! needs one [`Capability`]. The decision is made here and in the database
//! layer ([`crate::db`]), not in the HTTP handlers, so any front end built
//! on the database (a web console with sessions, another storage backend)
//! gets the same answers.

use epm_api::admin::AdminRole;

use crate::db::DbError;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Read anything: devices, policies, requests, the fleet's audit, the
    /// activity log, the list of admins and enrollment tokens.
    Read,
    /// Push and delete policy documents.
    ManagePolicies,
    /// Make and revoke enrollment tokens; remove and reset devices.
    ManageFleet,
    /// Approve, deny and revoke requests, answer offline challenges (at the
    /// admin's own level).
    Approve,
    /// Create admins, change their role, level and endpoint users, disable,
    /// enable and rotate other admins' tokens.
    ManageAdmins,
}

impl Capability {
    fn describe(self) -> &'static str {
        match self {
            Capability::Read => "read the platform",
            Capability::ManagePolicies => "push or delete policies (owner or policy_admin)",
            Capability::ManageFleet => {
                "manage enrollment tokens and devices (owner or policy_admin)"
            }
            Capability::Approve => "approve (an owner or approver with an approver level)",
            Capability::ManageAdmins => "manage admins (owner)",
        }
    }
}

/// An authenticated, enabled admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Name.
    pub name: String,
    /// What this admin may do.
    pub role: AdminRole,
    /// Approval level.
    pub approver_level: Option<u32>,
    /// The endpoint user names that are this admin.
    pub endpoint_users: Vec<String>,
}

impl Admin {
    /// Whether this admin has `capability`.
    pub fn can(&self, capability: Capability) -> bool {
        match capability {
            Capability::Read => true,
            Capability::ManagePolicies | Capability::ManageFleet => {
                matches!(self.role, AdminRole::Owner | AdminRole::PolicyAdmin)
            }
            Capability::Approve => self.role.may_approve() && self.approver_level.is_some(),
            Capability::ManageAdmins => self.role == AdminRole::Owner,
        }
    }

    /// `Ok` when this admin has `capability`, else a refusal naming the
    /// role it needs.
    pub fn require(&self, capability: Capability) -> Result<(), DbError> {
        if self.can(capability) {
            Ok(())
        } else {
            Err(DbError::Forbidden(format!(
                "{} is {}{}: only an admin who may {} can do this",
                self.name,
                self.role,
                self.approver_level
                    .map(|l| format!(" at level {l}"))
                    .unwrap_or_default(),
                capability.describe()
            )))
        }
    }

    /// Whether `user` (an endpoint login name) is this admin: nobody
    /// approves their own requests. Compared without ASCII case, as macOS
    /// compares login names.
    pub fn is_endpoint_user(&self, user: &str) -> bool {
        self.endpoint_users
            .iter()
            .any(|u| u.eq_ignore_ascii_case(user))
    }
}

/// Checks that a role and a level go together and that the level is in
/// `1..=highest` (the highest level any stored rule uses, at least 1, at
/// most [`epm_api::validate::MAX_APPROVAL_LEVEL`]).
pub fn check_role_and_level(
    role: AdminRole,
    level: Option<u32>,
    highest: u32,
) -> Result<(), DbError> {
    match (role.may_approve(), level) {
        (false, Some(_)) => {
            return Err(DbError::Invalid(format!(
                "a {role} cannot have an approver level: only owners and approvers approve"
            )));
        }
        (_, None) if role == AdminRole::Approver => {
            return Err(DbError::Invalid(
                "an approver needs an approver level".into(),
            ));
        }
        _ => {}
    }
    let highest = highest.clamp(1, epm_api::validate::MAX_APPROVAL_LEVEL);
    if let Some(level) = level
        && !(1..=highest).contains(&level)
    {
        return Err(DbError::Invalid(format!(
            "approver level {level} is outside 1..={highest}: no stored rule has more than {highest} level(s) (push the policy first)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(role: AdminRole, level: Option<u32>) -> Admin {
        Admin {
            name: "a".into(),
            role,
            approver_level: level,
            endpoint_users: vec!["Alice".into()],
        }
    }

    #[test]
    fn each_role_has_the_least_its_job_needs() {
        use Capability::*;
        let table = [
            (
                admin(AdminRole::Owner, Some(1)),
                [true, true, true, true, true],
            ),
            (
                admin(AdminRole::Owner, None),
                [true, true, true, false, true],
            ),
            (
                admin(AdminRole::PolicyAdmin, None),
                [true, true, true, false, false],
            ),
            (
                admin(AdminRole::Approver, Some(2)),
                [true, false, false, true, false],
            ),
            (
                admin(AdminRole::Auditor, None),
                [true, false, false, false, false],
            ),
        ];
        for (admin, expected) in table {
            let got =
                [Read, ManagePolicies, ManageFleet, Approve, ManageAdmins].map(|c| admin.can(c));
            assert_eq!(got, expected, "{admin:?}");
        }
        let err = admin(AdminRole::Approver, Some(1))
            .require(ManageAdmins)
            .unwrap_err();
        assert!(err.to_string().contains("(owner)"), "{err}");
        assert!(admin(AdminRole::Owner, None).is_endpoint_user("alice"));
    }

    #[test]
    fn levels_must_fit_the_role_and_the_rules() {
        assert!(check_role_and_level(AdminRole::Approver, Some(2), 2).is_ok());
        assert!(check_role_and_level(AdminRole::Approver, Some(1), 0).is_ok());
        for (role, level, highest) in [
            (AdminRole::Approver, Some(2), 1),
            (AdminRole::Approver, Some(0), 3),
            (AdminRole::Approver, Some(u32::MAX), 16),
            (AdminRole::Approver, Some(17), 40),
            (AdminRole::Approver, None, 1),
            (AdminRole::PolicyAdmin, Some(1), 1),
            (AdminRole::Auditor, Some(1), 1),
        ] {
            assert!(
                check_role_and_level(role, level, highest).is_err(),
                "{role} {level:?} {highest}"
            );
        }
    }
}

//! The infrastructure phase: the stack's machines and what they need (key
//! pair, security group, network), from one provider behind one object-safe
//! trait, one module per backend. Each provider operation is idempotent:
//! `create` on something that already exists (found by its tags) returns it
//! instead of making a second one, `delete` on something gone succeeds.
//!
//! The phase hands the bootstrap a [`Nodes`] capability (how to reach the
//! nodes), not the provider itself.

mod checks;
pub mod ec2;
pub mod kvm;
mod provider;

use std::sync::Arc;

use crate::artifacts::Artifacts;
use crate::engine::{
    Action, Change, ChangeInput, Expiring, Leftovers, Mode, Phase, PhaseError, PlanInput, PlanPart,
    Resource, Retries, StatusPart,
};
use crate::future::BoxFuture;
use crate::keys::StackKey;
use crate::model::{Provider as ProviderSettings, Stack};
use crate::nodes::Nodes;
use crate::state::{Record, State};
pub use checks::check;
pub use provider::{Provider, ProviderError};

#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error("cannot reach EC2 for stack {stack}")]
    Ec2 {
        stack: String,
        #[source]
        source: Box<ec2::Ec2Error>,
    },
    #[error("cannot plan the VMs of stack {stack}")]
    Kvm {
        stack: String,
        #[source]
        source: Box<kvm::KvmError>,
    },
    #[error("cannot refresh the infrastructure of stack {stack}")]
    Refresh {
        stack: String,
        #[source]
        source: ProviderError,
    },
    #[error("no `{kind}` change can be applied to {address}: it has no live id")]
    NoId { kind: String, address: String },
}

/// The stack's provider, as the infrastructure phase and as the nodes'
/// capability; `None` for a stack that makes no machines (an existing cluster).
pub async fn connect(
    stack: &Stack,
    key: &StackKey,
    artifacts: &Artifacts,
    lineage: &str,
) -> Result<Option<(Infra, Arc<dyn Nodes>)>, InfraError> {
    let stack_name = || stack.name.clone();
    Ok(match &stack.provider {
        Some(ProviderSettings::Ec2(settings)) if !stack.nodes.is_empty() => {
            let provider = Arc::new(
                ec2::Ec2Provider::connect(stack, settings, &key.public_openssh, artifacts, lineage)
                    .await
                    .map_err(|source| InfraError::Ec2 {
                        stack: stack_name(),
                        source: Box::new(source),
                    })?,
            );
            Some((Infra::new(&stack.name, provider.clone()), provider))
        }
        Some(ProviderSettings::Kvm(settings)) if !stack.nodes.is_empty() => {
            let provider = Arc::new(
                kvm::KvmProvider::new(
                    stack,
                    settings,
                    &key.private_path,
                    &key.public_openssh,
                    artifacts,
                )
                .map_err(|source| InfraError::Kvm {
                    stack: stack_name(),
                    source: Box::new(source),
                })?,
            );
            Some((Infra::new(&stack.name, provider.clone()), provider))
        }
        _ => None,
    })
}

/// The infrastructure phase over its provider.
pub struct Infra {
    stack: String,
    provider: Arc<dyn Provider>,
}

impl Infra {
    pub fn new(stack: &str, provider: Arc<dyn Provider>) -> Infra {
        Infra {
            stack: stack.to_string(),
            provider,
        }
    }

    async fn plan_part(&self, input: PlanInput<'_>) -> Result<PlanPart, PhaseError> {
        let mut observed = self
            .provider
            .refresh(input.records)
            .await
            .map_err(|source| InfraError::Refresh {
                stack: self.stack.clone(),
                source,
            })?;
        if input.adopt {
            for live in &mut observed {
                live.handling.foreign = None;
            }
        }
        Ok(match input.mode {
            Mode::Destroy => crate::engine::plan::destroy(input.records, &observed),
            _ => crate::engine::plan::diff(&self.provider.desired(), input.records, &observed),
        })
    }

    async fn apply_change(
        &self,
        change: &Change,
        input: ChangeInput<'_>,
    ) -> Result<Option<Record>, PhaseError> {
        let provider = &self.provider;
        let id = || {
            change.id.as_deref().ok_or_else(|| InfraError::NoId {
                kind: change.kind.clone(),
                address: change.address.clone(),
            })
        };
        let resource = || Resource {
            address: change.address.clone(),
            kind: change.kind.clone(),
            attrs: change.after.clone().unwrap_or_default(),
            handling: Default::default(),
        };
        Ok(match change.action {
            Action::Create => Some(
                provider
                    .create(&resource(), input.token, input.state)
                    .await?,
            ),
            Action::Update => Some(provider.update(change, input.state).await?),
            Action::Replace => {
                provider.delete(&change.kind, id()?).await?;
                Some(
                    provider
                        .create(&resource(), input.token, input.state)
                        .await?,
                )
            }
            Action::Delete => {
                provider.delete(&change.kind, id()?).await?;
                None
            }
        })
    }
}

impl Phase for Infra {
    fn name(&self) -> &str {
        "infrastructure"
    }

    fn owns(&self, record: &Record) -> bool {
        self.provider.kinds().contains(&record.kind.as_str())
    }

    fn plan<'a>(&'a self, input: PlanInput<'a>) -> BoxFuture<'a, Result<PlanPart, PhaseError>> {
        Box::pin(self.plan_part(input))
    }

    fn apply<'a>(
        &'a self,
        change: &'a Change,
        input: ChangeInput<'a>,
    ) -> BoxFuture<'a, Result<Option<Record>, PhaseError>> {
        Box::pin(self.apply_change(change, input))
    }

    fn leftovers(&self) -> BoxFuture<'_, Result<Leftovers, PhaseError>> {
        self.provider.leftovers()
    }

    fn environments(&self) -> BoxFuture<'_, Result<Vec<Expiring>, PhaseError>> {
        self.provider.environments()
    }

    fn status<'a>(&'a self, _state: &'a State) -> BoxFuture<'a, Result<StatusPart, PhaseError>> {
        self.provider.status()
    }

    fn retries(&self) -> Option<Retries> {
        self.provider.retries()
    }
}

//! The admin API (`spool.admin.v1`, gRPC), served on `--admin-bind`: identities, twins and
//! direct methods today; routes, queues and the upstream link join it with their issues. It calls the
//! same registry the listeners authenticate with, so a change counts for the next CONNECT, and
//! connected clients whose credentials it revokes are disconnected (`Authenticator`'s change
//! announcements). `spool identity` is its client when a server holds the data directory.
//!
//! Bound to loopback by default; anything else must be a trusted network until the admin API
//! gets TLS and a token (operations issue).

pub mod convert;

use crate::auth::authenticator::Authenticator;
use crate::auth::identity::{Credentials, IdentitiesFile, Identity, IdentityId, Status};
use crate::auth::registry::RegistryError;
use crate::method::{MethodCall, MethodError, Methods};
use crate::twin::{TwinError, TwinStore};
use convert::{identity_from_proto, identity_to_proto};
use spool_proto::admin as pb;
use spool_proto::admin::admin_server::{Admin, AdminServer};
use spool_storage::Meta;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response};

/// The admin service: the registry, through its authenticator, and the store it commits to.
#[derive(Debug, Clone)]
pub struct AdminService {
    context: Arc<AdminContext>,
}

/// What the admin service changes.
#[derive(Debug)]
pub struct AdminContext {
    pub authenticator: Arc<Authenticator>,
    pub meta: Arc<Meta>,
    pub twins: Arc<TwinStore>,
    pub methods: Arc<Methods>,
}

/// Where a running server's admin API is, for the commands that only go through it (`spool
/// twin`, `spool method`): the same settings as `spool serve`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The `spool serve` configuration file whose settings apply (`admin_bind`).
    #[arg(long, env = "SPOOL_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// The admin API of the running server [default: 127.0.0.1:50051].
    #[arg(long, env = "SPOOL_ADMIN_BIND", global = true)]
    pub admin_bind: Option<String>,
}

impl AdminArgs {
    /// A client of the admin API these settings name, with the runtime to call it on; `what`
    /// says what goes through it, for the error when it is off.
    ///
    /// # Errors
    /// The settings do not resolve, the admin API is off, or it cannot be reached.
    pub fn client(
        &self,
        what: &str,
    ) -> anyhow::Result<(
        tokio::runtime::Runtime,
        spool_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    )> {
        let config = crate::config::Config::resolve(crate::config::ServeArgs {
            config: self.config.clone(),
            admin_bind: self.admin_bind.clone(),
            ..crate::config::ServeArgs::default()
        })?;
        let Some(addr) = config.admin_bind.as_deref() else {
            anyhow::bail!("the admin API is off (--admin-bind is empty): {what} go through it");
        };
        client(addr)
    }
}

/// A client of the admin API at `addr`, with the runtime to call it on (for the CLI).
///
/// # Errors
/// The runtime cannot start, or the server cannot be reached.
pub fn client(
    addr: &str,
) -> anyhow::Result<(
    tokio::runtime::Runtime,
    spool_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
)> {
    use anyhow::Context as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let endpoint = format!("http://{addr}");
    let connected = runtime.block_on(spool_proto::admin::admin_client::AdminClient::connect(
        endpoint,
    ));
    let client =
        connected.with_context(|| format!("reach the running server's admin API at {addr}"))?;
    Ok((runtime, client))
}

/// Serves the admin API on `listener` until `shutdown`.
///
/// # Errors
/// The server failed.
pub async fn serve(
    listener: TcpListener,
    context: AdminContext,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let service = AdminService {
        context: Arc::new(context),
    };
    tonic::transport::Server::builder()
        .add_service(AdminServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await
}

/// A registry error as a gRPC status (see `admin.proto`).
fn status(error: RegistryError) -> tonic::Status {
    match &error {
        RegistryError::NotFound(_) => tonic::Status::not_found(error.to_string()),
        RegistryError::Exists(_) => tonic::Status::already_exists(error.to_string()),
        RegistryError::Identity(_) => tonic::Status::invalid_argument(error.to_string()),
        RegistryError::NotSas(_)
        | RegistryError::RotateDerived(_)
        | RegistryError::NoDeviceKey { .. }
        | RegistryError::DevicesModulesDerive { .. } => {
            tonic::Status::failed_precondition(error.to_string())
        }
        RegistryError::Storage(_) | RegistryError::Corrupt { .. } | RegistryError::Random(_) => {
            tracing::error!("admin API: {error}");
            tonic::Status::internal(error.to_string())
        }
    }
}

/// A direct method's failure as a gRPC status (see `admin.proto`).
fn method_status(error: MethodError) -> tonic::Status {
    let why = error.to_string();
    match error {
        MethodError::BadRequest(_) => tonic::Status::invalid_argument(why),
        MethodError::UnknownTarget(_) | MethodError::NotConnected(_) => {
            tonic::Status::not_found(why)
        }
        MethodError::Timeout { .. } => tonic::Status::deadline_exceeded(why),
        MethodError::TooMany | MethodError::ShuttingDown => tonic::Status::unavailable(why),
        MethodError::BadAnswer(_) => tonic::Status::internal(why),
    }
}

fn parse_id(id: &str) -> Result<IdentityId, tonic::Status> {
    IdentityId::parse(id).map_err(|e| tonic::Status::invalid_argument(e.to_string()))
}

impl AdminService {
    /// The identity `id` names, if the registry has it (NOT_FOUND otherwise).
    fn registered(&self, id: &str) -> Result<IdentityId, tonic::Status> {
        let id = parse_id(id)?;
        match self.context.authenticator.registry().get(&id) {
            Some(_) => Ok(id),
            None => Err(status(RegistryError::NotFound(id))),
        }
    }

    /// `id`'s twin, as the admin API answers it.
    fn twin(&self, id: &IdentityId) -> Response<pb::Twin> {
        let json = self.context.twins.get(id).document().to_string();
        Response::new(pb::Twin { json })
    }

    /// Runs a change of the registry on a blocking thread (it commits to the metadata
    /// store); returns what it returns.
    async fn run_change<T: Send + 'static>(
        &self,
        change: impl FnOnce(&AdminContext) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let context = Arc::clone(&self.context);
        let changed = tokio::task::spawn_blocking(move || change(&context))
            .await
            .map_err(|e| tonic::Status::internal(format!("the change failed: {e}")))?;
        changed.map_err(status)
    }

    /// [`AdminService::run_change`], answering with the identity the change returns.
    async fn change(
        &self,
        change: impl FnOnce(&AdminContext) -> Result<Identity, RegistryError> + Send + 'static,
    ) -> Result<Response<pb::Identity>, tonic::Status> {
        let identity = self.run_change(change).await?;
        Ok(Response::new(identity_to_proto(&identity)))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_twin(
        &self,
        request: Request<pb::IdentityRequest>,
    ) -> Result<Response<pb::Twin>, tonic::Status> {
        let id = self.registered(&request.into_inner().id)?;
        Ok(self.twin(&id))
    }

    async fn patch_desired(
        &self,
        request: Request<pb::PatchDesiredRequest>,
    ) -> Result<Response<pb::Twin>, tonic::Status> {
        let request = request.into_inner();
        let id = self.registered(&request.id)?;
        let twins = Arc::clone(&self.context.twins);
        let patched = {
            let id = id.clone();
            tokio::task::spawn_blocking(move || twins.patch_desired(&id, request.patch.as_bytes()))
        };
        // The store sends the patch to the module, in order with every other.
        patched
            .await
            .map_err(|e| tonic::Status::internal(format!("the patch failed: {e}")))?
            .map_err(|e| match e {
                TwinError::Invalid(why) => tonic::Status::invalid_argument(why),
                TwinError::NoIdentity(_) => tonic::Status::not_found(e.to_string()),
                other => tonic::Status::internal(other.to_string()),
            })?;
        Ok(self.twin(&id))
    }

    async fn invoke_method(
        &self,
        request: Request<pb::InvokeMethodRequest>,
    ) -> Result<Response<pb::MethodResult>, tonic::Status> {
        let request = request.into_inner();
        let id = self.registered(&request.id)?;
        let payload = match request.payload.trim() {
            "" => serde_json::Value::Null,
            payload => serde_json::from_str(payload).map_err(|e| {
                tonic::Status::invalid_argument(format!("the payload is not JSON: {e}"))
            })?,
        };
        let response_timeout = Some(u64::from(request.response_timeout_secs)).filter(|&s| s > 0);
        let connect_timeout = Some(u64::from(request.connect_timeout_secs));
        let call = MethodCall::new(
            id,
            request.method_name,
            payload,
            response_timeout,
            connect_timeout,
        )
        .map_err(method_status)?;
        let result = self
            .context
            .methods
            .invoke(call)
            .await
            .map_err(method_status)?;
        Ok(Response::new(pb::MethodResult {
            status: result.status,
            payload: result.payload.to_string(),
        }))
    }

    async fn list_identities(
        &self,
        _: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, tonic::Status> {
        let registry = self.context.authenticator.registry();
        let identities = registry.iter().map(identity_to_proto).collect();
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }

    async fn get_identity(
        &self,
        request: Request<pb::IdentityRequest>,
    ) -> Result<Response<pb::Identity>, tonic::Status> {
        let id = parse_id(&request.into_inner().id)?;
        let registry = self.context.authenticator.registry();
        let identity = registry.get(&id).ok_or(RegistryError::NotFound(id));
        Ok(Response::new(identity_to_proto(identity.map_err(status)?)))
    }

    async fn add_identity(
        &self,
        request: Request<pb::AddIdentityRequest>,
    ) -> Result<Response<pb::Identity>, tonic::Status> {
        let given = request.into_inner().identity.unwrap_or_default();
        let new_keys = || Ok(Credentials::new_sas()?);
        let identity = identity_from_proto(given, new_keys)
            .map_err(|e| tonic::Status::invalid_argument(format!("{e:#}")))?;
        self.change(move |context| {
            context
                .authenticator
                .change_registry(|registry| Ok(registry.add(&context.meta, identity)?.clone()))
        })
        .await
    }

    async fn import_identities(
        &self,
        request: Request<pb::ImportIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, tonic::Status> {
        let invalid = |e: anyhow::Error| tonic::Status::invalid_argument(format!("{e:#}"));
        let no_keys = || anyhow::bail!("an identity to import names its credentials");
        let identities = request
            .into_inner()
            .identities
            .into_iter()
            .map(|identity| identity_from_proto(identity, no_keys))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(invalid)?;
        let file = IdentitiesFile { identities };
        file.check().map_err(|e| invalid(e.into()))?;
        let identities = self
            .run_change(move |context| {
                let ids: Vec<IdentityId> = file.identities.iter().map(|i| i.id.clone()).collect();
                context.authenticator.change_registry(|registry| {
                    registry.seed(&context.meta, file)?;
                    let stored = ids.iter().filter_map(|id| registry.get(id));
                    Ok(stored.map(identity_to_proto).collect())
                })
            })
            .await?;
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }

    async fn remove_identity(
        &self,
        request: Request<pb::IdentityRequest>,
    ) -> Result<Response<pb::Identity>, tonic::Status> {
        let id = parse_id(&request.into_inner().id)?;
        self.change(move |context| {
            let registry = &context.authenticator;
            let remove = || registry.change_registry(|r| r.remove(&context.meta, &id));
            context.twins.forget_with(&id, remove)
        })
        .await
    }

    async fn set_identity_status(
        &self,
        request: Request<pb::SetIdentityStatusRequest>,
    ) -> Result<Response<pb::Identity>, tonic::Status> {
        let request = request.into_inner();
        let id = parse_id(&request.id)?;
        let status = match request.status() {
            pb::Status::Enabled => Status::Enabled,
            pb::Status::Disabled => Status::Disabled,
            pb::Status::Unspecified => {
                return Err(tonic::Status::invalid_argument("no status given"));
            }
        };
        self.change(move |context| {
            context.authenticator.change_registry(|registry| {
                let changed = registry.update(&context.meta, &id, |i| i.status = status)?;
                Ok(changed.clone())
            })
        })
        .await
    }

    async fn rotate_identity_keys(
        &self,
        request: Request<pb::RotateIdentityKeysRequest>,
    ) -> Result<Response<pb::Identity>, tonic::Status> {
        let request = request.into_inner();
        let id = parse_id(&request.id)?;
        let (primary, secondary) = match request.keys() {
            pb::KeySelection::Primary => (true, false),
            pb::KeySelection::Secondary => (false, true),
            pb::KeySelection::Both | pb::KeySelection::Unspecified => (true, true),
        };
        self.change(move |context| {
            context.authenticator.change_registry(|registry| {
                let rotated = registry.rotate(&context.meta, &id, primary, secondary)?;
                Ok(rotated.clone())
            })
        })
        .await
    }
}

//! Connections to PostgreSQL: the client configuration (timeouts, TLS by
//! `sslmode`), the pool, the dedicated LISTEN connection, and the start-up
//! check that turns a refused password or a missing database into a
//! configuration error naming the key.

use crate::config::{PgTarget, SslMode};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A PostgreSQL problem, as the result store reports it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The URL or TLS settings cannot be used.
    #[error("configuration key `result_backend`: {detail}")]
    Config { detail: String },
    /// PostgreSQL refused the credentials.
    #[error(
        "configuration key `result_backend_password`: PostgreSQL refused the login of user \
         {user:?}: {detail} (check result_backend_password / result_backend_password_file)"
    )]
    Auth { user: String, detail: String },
    /// TLS could not be set up: the server has no TLS (`sslmode=require`
    /// or `verify-full` against `ssl=off`) or its certificate was refused.
    #[error(
        "configuration key `result_backend`: TLS to PostgreSQL failed: {detail} (check the \
         URL's sslmode and sslrootcert, and the server's ssl settings)"
    )]
    Tls { detail: String },
    /// The database named in the URL does not exist.
    #[error("configuration key `result_backend`: {detail} (create it, or fix the URL's database)")]
    NoDatabase { detail: String },
    /// Anything else: the server is down, a statement failed or timed out.
    #[error("{op} failed: PostgreSQL: {detail}")]
    Op { op: &'static str, detail: String },
}

impl PgError {
    /// Whether retrying cannot help until the configuration changes.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Config { .. } | Self::Auth { .. } | Self::NoDatabase { .. } | Self::Tls { .. }
        )
    }

    pub(crate) fn op(op: &'static str, e: &dyn std::fmt::Display) -> Self {
        Self::Op {
            op,
            detail: e.to_string(),
        }
    }

    /// Classifies a client error: refused logins, missing databases and
    /// TLS refusals are configuration errors.
    pub(crate) fn from_pg(op: &'static str, user: &str, e: &tokio_postgres::Error) -> Self {
        if let Some(detail) = tls_refusal(e) {
            return Self::Tls { detail };
        }
        let detail = e
            .as_db_error()
            .map_or_else(|| full_chain(e), |d| d.message().to_owned());
        match e.code() {
            Some(c)
                if *c == SqlState::INVALID_PASSWORD
                    || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
            {
                Self::Auth {
                    user: user.to_owned(),
                    detail,
                }
            }
            Some(c) if *c == SqlState::INVALID_CATALOG_NAME => Self::NoDatabase { detail },
            _ => Self::Op { op, detail },
        }
    }
}

/// Why TLS was refused, when it was: the server does not offer it, or
/// rustls refused the handshake (an unknown issuer, a wrong host name, an
/// alert). A connection cut during the handshake is not a refusal.
fn tls_refusal(e: &tokio_postgres::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(t) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t.to_string());
        }
        if c.to_string() == "server does not support TLS" {
            return Some("the server does not support TLS (it runs with ssl=off)".into());
        }
        cur = c.source();
    }
    None
}

/// An error's message with its sources (tokio-postgres puts the cause of a
/// failed connection in `source`).
fn full_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A connection to drive (the other half of a `Client`).
pub(crate) type PgConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// How to reach the server: the client configuration and the TLS connector.
#[derive(Clone)]
pub(crate) struct Connector {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub user: String,
    /// Deadline of one operation (a few round trips) on the client side.
    pub timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("user", &self.user)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Client settings from `target`: `timeout` bounds a connection attempt,
    /// each statement (`statement_timeout`) and unacknowledged writes
    /// (`tcp_user_timeout`), so a vanished server is noticed.
    pub fn new(target: &PgTarget, timeout: Duration) -> Result<Self, PgError> {
        let mut config: tokio_postgres::Config =
            target
                .url()
                .parse()
                .map_err(|e: tokio_postgres::Error| PgError::Config {
                    detail: format!("{}: {e}", target.redacted()),
                })?;
        let ms = timeout.as_millis();
        let options = match config.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} -c statement_timeout={ms}"),
            _ => format!("-c statement_timeout={ms}"),
        };
        config
            .options(options)
            .connect_timeout(timeout)
            .tcp_user_timeout(timeout.max(Duration::from_secs(1)) * 2)
            .keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("taskstack");
        }
        config.ssl_mode(match target.ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let tls = MakeRustlsConnect::new(super::tls::client_config(target)?);
        let user = config.get_user().unwrap_or_default().to_owned();
        Ok(Self {
            config,
            tls,
            user,
            timeout,
        })
    }

    /// A pool of up to `size` connections, opened lazily.
    pub fn pool(&self, size: usize) -> Result<Pool, PgError> {
        let manager = Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.timeout))
            .create_timeout(Some(self.timeout))
            .recycle_timeout(Some(self.timeout))
            .build()
            .map_err(|e| PgError::Config {
                detail: e.to_string(),
            })
    }

    /// One connection of its own, driven by a task the returned handle owns.
    pub async fn connect(
        &self,
        op: &'static str,
    ) -> Result<(tokio_postgres::Client, PgConnection), PgError> {
        let connecting = self.config.connect(self.tls.clone());
        match tokio::time::timeout(self.timeout, connecting).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(PgError::from_pg(op, &self.user, &e)),
            Err(_) => Err(PgError::Op {
                op,
                detail: format!("no connection within {:?}", self.timeout),
            }),
        }
    }
}

/// The error of taking a connection from the pool.
pub(crate) fn pool_error(op: &'static str, user: &str, e: deadpool_postgres::PoolError) -> PgError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => PgError::from_pg(op, user, &e),
        other => PgError::op(op, &other),
    }
}

/// Checks the server answers with these credentials and database, and runs
/// the schema migrations (under an advisory lock, so many processes
/// starting at once do not race). A refused login or a missing database is
/// an error at once ([`PgError::is_config`]); an unreachable server is
/// retried with backoff until `give_up` elapses.
pub async fn prepare(
    target: &PgTarget,
    timeout: Duration,
    give_up: Duration,
) -> Result<(), PgError> {
    let connector = Connector::new(target, timeout)?;
    let deadline = tokio::time::Instant::now() + give_up;
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let (mut client, conn) = connector.connect("connect to PostgreSQL").await?;
            let driver = tokio::spawn(conn);
            let done = super::schema::migrate(&mut client).await;
            drop(client);
            let _ = driver.await;
            done
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_config() => return Err(e),
            Err(e) if tokio::time::Instant::now() + delay >= deadline => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "PostgreSQL result store not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Shared handles of one PostgreSQL store.
#[derive(Debug, Clone)]
pub(crate) struct Handles {
    pub pool: Pool,
    pub connector: Arc<Connector>,
}

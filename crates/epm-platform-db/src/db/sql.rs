//! One small SQL interface over the two stores the platform runs on:
//! SQLite (one file, the embedded default) and PostgreSQL (one database
//! shared by any number of platform instances).
//!
//! The platform's queries are written once, in the SQL both understand
//! (`?N` placeholders, translated to `$N` for PostgreSQL; the few spots
//! where the dialects differ ask [`Conn::is_postgres`]). Values cross as
//! [`Value`]s, so a query's code does not depend on the driver.
//!
//! The methods are synchronous: the platform's database code is a sequence
//! of short statements, often in one transaction. On the server's
//! multi-threaded runtime every blocking step goes through
//! [`tokio::task::block_in_place`], so a worker waiting for SQLite's lock
//! or PostgreSQL's answer hands its other tasks to another thread instead
//! of stalling them. PostgreSQL is reached with tokio-postgres and a
//! deadpool pool whose connections run on a small runtime of their own,
//! so the same code works from the server, the CLI and current-thread
//! tests.

use std::fmt;
use std::sync::{Arc, MutexGuard};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// What a parameter is, NULL or not: PostgreSQL must know each
/// parameter's type when it prepares a statement, and `?1 IS NULL OR x = ?1`
/// does not tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// BIGINT.
    Int,
    /// DOUBLE PRECISION.
    Real,
    /// TEXT.
    Text,
    /// BYTEA.
    Blob,
}

impl Kind {
    fn pg(self) -> Type {
        match self {
            Kind::Int => Type::INT8,
            Kind::Real => Type::FLOAT8,
            Kind::Text => Type::TEXT,
            Kind::Blob => Type::BYTEA,
        }
    }
}

/// A value going to or coming from the database.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// NULL, of a kind.
    Null(Kind),
    /// Any integer (booleans are 0/1).
    Int(i64),
    /// A float.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// A statement failed, or a column was not what the code expected.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// SQLite failed.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("{}", pg_error(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection from the pool.
    #[error("no PostgreSQL connection: {0}")]
    Pool(String),
    /// A query that must return a row returned none.
    #[error("query returned no rows")]
    NoRows,
    /// A column holds something else than expected.
    #[error("column {index}: {message}")]
    Conversion {
        /// Column, 0-based.
        index: usize,
        /// What was wrong.
        message: String,
    },
}

/// PostgreSQL's message with its detail, which `Display` leaves out.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

impl SqlError {
    /// A column that did not convert.
    pub fn conversion(index: usize, message: impl fmt::Display) -> SqlError {
        SqlError::Conversion {
            index,
            message: message.to_string(),
        }
    }

    /// A uniqueness violation (the row exists).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            SqlError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            SqlError::Postgres(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
            }
            _ => false,
        }
    }
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, SqlError>;

/// `query_row(...).optional()`: no row is `None`.
pub trait OptionalExtension<T> {
    /// `Ok(None)` for [`SqlError::NoRows`].
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(SqlError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

// ---- values in ----------------------------------------------------------

/// Something that binds as a parameter.
pub trait ToValue {
    /// Its kind, for a NULL of this type.
    const KIND: Kind;
    /// The value.
    fn to_value(&self) -> Value;
}

macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            const KIND: Kind = Kind::Int;
            fn to_value(&self) -> Value {
                // Unsigned values above i64::MAX do not occur (counts,
                // sequence numbers); saturate rather than wrap if one did.
                Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
            }
        }
    )*};
}
int_to_value!(i64, i32, u8, u16, u32, u64, usize);

impl ToValue for bool {
    const KIND: Kind = Kind::Int;
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl ToValue for f64 {
    const KIND: Kind = Kind::Real;
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl ToValue for str {
    const KIND: Kind = Kind::Text;
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}
impl ToValue for String {
    const KIND: Kind = Kind::Text;
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToValue for [u8] {
    const KIND: Kind = Kind::Blob;
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl ToValue for Vec<u8> {
    const KIND: Kind = Kind::Blob;
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl<const N: usize> ToValue for [u8; N] {
    const KIND: Kind = Kind::Blob;
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    const KIND: Kind = T::KIND;
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    const KIND: Kind = T::KIND;
    fn to_value(&self) -> Value {
        self.as_ref()
            .map_or(Value::Null(T::KIND), ToValue::to_value)
    }
}

/// A statement's parameters.
pub trait Params {
    /// In order: `?1` first.
    fn into_values(self) -> Vec<Value>;
}
impl Params for Vec<Value> {
    fn into_values(self) -> Vec<Value> {
        self
    }
}
impl<T: ToValue, const N: usize> Params for [T; N] {
    fn into_values(self) -> Vec<Value> {
        self.iter().map(ToValue::to_value).collect()
    }
}

/// Parameters of mixed types, as `rusqlite::params!`.
macro_rules! params {
    () => { Vec::<$crate::db::sql::Value>::new() };
    ($($x:expr),+ $(,)?) => {
        vec![$($crate::db::sql::ToValue::to_value(&$x)),+]
    };
}
pub(crate) use params;

// ---- values out ---------------------------------------------------------

/// Something a column converts to.
pub trait FromValue: Sized {
    /// From column `index`'s value.
    fn from_value(value: &Value, index: usize) -> Result<Self>;
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: &Value, index: usize) -> Result<Self> {
                match value {
                    Value::Int(i) => <$t>::try_from(*i).map_err(|_| {
                        SqlError::conversion(index, format_args!("{i} is out of range for {}", stringify!($t)))
                    }),
                    other => Err(SqlError::conversion(index, format_args!("expected an integer, found {other:?}"))),
                }
            }
        }
    )*};
}
int_from_value!(i64, i32, u8, u16, u32, u64, usize);

impl FromValue for bool {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        Ok(i64::from_value(value, index)? != 0)
    }
}
impl FromValue for f64 {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        match value {
            Value::Real(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            other => Err(SqlError::conversion(
                index,
                format_args!("expected a number, found {other:?}"),
            )),
        }
    }
}
impl FromValue for String {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        match value {
            Value::Text(s) => Ok(s.clone()),
            other => Err(SqlError::conversion(
                index,
                format_args!("expected text, found {other:?}"),
            )),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        match value {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(SqlError::conversion(
                index,
                format_args!("expected bytes, found {other:?}"),
            )),
        }
    }
}
impl FromValue for Value {
    fn from_value(value: &Value, _: usize) -> Result<Self> {
        Ok(value.clone())
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        match value {
            Value::Null(_) => Ok(None),
            v => T::from_value(v, index).map(Some),
        }
    }
}

/// A column index (0-based), as rusqlite's `get::<_, T>(i)` takes it.
pub trait RowIndex {
    /// The index.
    fn index(self) -> usize;
}
impl RowIndex for usize {
    fn index(self) -> usize {
        self
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    /// Column `index` as `T`.
    pub fn get<I: RowIndex, T: FromValue>(&self, index: I) -> Result<T> {
        let index = index.index();
        let value = self
            .values
            .get(index)
            .ok_or_else(|| SqlError::conversion(index, "no such column"))?;
        T::from_value(value, index)
    }
}

// ---- blocking -----------------------------------------------------------

/// Runs `f`, which blocks, without stalling the async runtime's other
/// tasks: on a multi-threaded runtime's worker through `block_in_place`;
/// elsewhere (a blocking thread, the CLI, a current-thread test) as is.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

// ---- PostgreSQL -----------------------------------------------------------

/// A PostgreSQL pool and the runtime its connections run on.
pub struct Pg {
    pool: Pool,
    runtime: Option<tokio::runtime::Runtime>,
    target: Box<super::pg_tls::PgTarget>,
}

impl fmt::Debug for Pg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pg").finish_non_exhaustive()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks, which is refused inside
        // another runtime: let its threads go on their own.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The password in a database URL, hidden for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user_pass = &url[scheme + 3..at];
            match user_pass.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl Pg {
    /// A pool of up to `size` connections to `url` (`postgres://…`).
    pub fn connect(url: &str, size: usize) -> Result<Pg> {
        let target = super::pg_tls::PgTarget::parse(url, &redact(url))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("epm-postgres")
            .enable_all()
            .build()
            .map_err(|e| SqlError::Pool(format!("starting the PostgreSQL runtime: {e}")))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &target.tls {
            None => {
                Manager::from_config(target.config.clone(), tokio_postgres::NoTls, manager_config)
            }
            Some(tls) => Manager::from_config(target.config.clone(), tls.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(30)))
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .build()
            .map_err(|e| SqlError::Pool(e.to_string()))?;
        let pg = Pg {
            pool,
            runtime: Some(runtime),
            target: Box::new(target),
        };
        // Fail at start, with the reason, rather than at the first call.
        drop(pg.client()?);
        Ok(pg)
    }

    /// The connection settings (with the password and TLS), for the
    /// listener's own connection.
    pub(crate) fn target(&self) -> &super::pg_tls::PgTarget {
        &self.target
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Taken only in Drop.
        self.runtime.as_ref().expect("PostgreSQL runtime present")
    }

    /// Runs `future` on the PostgreSQL runtime and waits for it.
    pub fn run<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = self.runtime().spawn(future);
        blocking(|| futures_executor::block_on(handle)).unwrap_or_else(|e| {
            // The future panicked or the runtime is shutting down.
            std::panic::resume_unwind(e.into_panic())
        })
    }

    /// Spawns `future` on the PostgreSQL runtime (the listener).
    pub fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.runtime().spawn(future);
    }

    fn client(&self) -> Result<deadpool_postgres::Object> {
        let pool = self.pool.clone();
        self.run(async move { pool.get().await })
            .map_err(|e| SqlError::Pool(crate::error_chain(&e)))
    }
}

/// A statement in PostgreSQL's words, translated once per distinct text.
fn to_postgres(sql: &str) -> Arc<str> {
    static CACHE: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<str>>>,
    > = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(done) = cache.get(sql) {
        return done.clone();
    }
    let done: Arc<str> = translate(sql).into();
    // The statements are the platform's own, a bounded set; the cap only
    // guards against a future caller formatting values into SQL.
    if cache.len() < 4096 {
        cache.insert(sql.to_owned(), done.clone());
    }
    done
}

/// `?N` → `$N` outside quotes, and the SQLite functions the platform uses
/// in PostgreSQL's terms: `julianday(x)` compares instants
/// (`CAST(CAST(x AS TEXT) AS timestamptz)`), `json_extract(c, '$.f')` is
/// `(c::jsonb ->> 'f')`, `instr` is `strpos`, `group_concat` is
/// `string_agg`, `rowid` is `ctid`, `LIMIT -1` is `LIMIT ALL`.
fn translate(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '?' => {
                out.push('$');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    let mut out = rewrite_calls(&out, "julianday(", |arg| {
        format!("CAST(CAST({arg} AS TEXT) AS timestamptz)")
    });
    out = rewrite_calls(&out, "json_extract(", |args| {
        match args.split_once(", '$.") {
            Some((column, field)) => format!("({column}::jsonb ->> '{field})"),
            None => format!("json_extract({args})"),
        }
    });
    out.replace("instr(", "strpos(")
        .replace("group_concat(", "string_agg(")
        .replace("rowid", "ctid")
        .replace("LIMIT -1", "LIMIT ALL")
}

/// Replaces each `name(args)` (balanced parentheses) with `f(args)`.
fn rewrite_calls(sql: &str, name: &str, f: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(start) = rest.find(name) {
        out.push_str(&rest[..start]);
        let args_start = start + name.len();
        let mut depth = 1usize;
        let mut end = None;
        for (i, c) in rest[args_start..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(args_start + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            out.push_str(&rest[start..]);
            return out;
        };
        out.push_str(&f(&rest[args_start..end]));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

impl Value {
    fn kind(&self) -> Kind {
        match self {
            Value::Null(kind) => *kind,
            Value::Int(_) => Kind::Int,
            Value::Real(_) => Kind::Real,
            Value::Text(_) => Kind::Text,
            Value::Blob(_) => Kind::Blob,
        }
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // The type is what PostgreSQL inferred for the placeholder: convert
        // to it, as SQLite's loose typing would have.
        match self {
            Value::Null(_) => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => Err(format!("an integer for a {ty} parameter").into()),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => Err(format!("a float for a {ty} parameter").into()),
            },
            Value::Text(s) => match *ty {
                Type::TIMESTAMPTZ | Type::INT8 | Type::INT4 => {
                    Err(format!("text for a {ty} parameter: cast it in the SQL").into())
                }
                _ => s.as_str().to_sql(&Type::TEXT, out),
            },
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn pg_row(row: &tokio_postgres::Row) -> Result<Row> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => row
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Value::Real),
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                row.try_get::<_, Option<String>>(i)?.map(Value::Text)
            }
            ref other => {
                return Err(SqlError::conversion(
                    i,
                    format_args!("unsupported PostgreSQL type {other}"),
                ));
            }
        };
        values.push(value.unwrap_or(Value::Null(Kind::Text)));
    }
    Ok(Row { values })
}

// ---- connections --------------------------------------------------------

enum Inner<'a> {
    Sqlite(MutexGuard<'a, rusqlite::Connection>),
    Postgres {
        pg: &'a Pg,
        client: Box<deadpool_postgres::Object>,
    },
}

/// One connection: SQLite's (under the database's lock) or one from the
/// PostgreSQL pool.
#[allow(missing_debug_implementations)]
pub struct Conn<'a> {
    inner: Inner<'a>,
}

impl<'a> Conn<'a> {
    /// SQLite's connection, already locked.
    pub fn sqlite(guard: MutexGuard<'a, rusqlite::Connection>) -> Conn<'a> {
        Conn {
            inner: Inner::Sqlite(guard),
        }
    }

    /// A connection from the pool.
    pub fn postgres(pg: &'a Pg) -> Result<Conn<'a>> {
        Ok(Conn {
            inner: Inner::Postgres {
                pg,
                client: Box::new(pg.client()?),
            },
        })
    }

    /// Whether this is PostgreSQL (for the few statements that differ).
    pub fn is_postgres(&self) -> bool {
        matches!(self.inner, Inner::Postgres { .. })
    }

    fn pg_query(&self, sql: &str, params: Vec<Value>) -> Result<Vec<tokio_postgres::Row>> {
        let Inner::Postgres { client, .. } = &self.inner else {
            unreachable!("pg_query on SQLite")
        };
        let sql = to_postgres(sql);
        let sql: &str = &sql;
        let types: Vec<Type> = params.iter().map(Value::kind).map(Kind::pg).collect();
        blocking(|| {
            futures_executor::block_on(async {
                let statement = client.prepare_typed_cached(sql, &types).await?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                client.query(&statement, &refs).await
            })
        })
        .map_err(|e| {
            tracing::debug!("PostgreSQL statement failed: {}: {sql}", pg_error(&e));
            SqlError::from(e)
        })
    }

    fn pg_execute(&self, sql: &str, params: Vec<Value>) -> Result<usize> {
        let Inner::Postgres { client, .. } = &self.inner else {
            unreachable!("pg_execute on SQLite")
        };
        let sql = to_postgres(sql);
        let sql: &str = &sql;
        let types: Vec<Type> = params.iter().map(Value::kind).map(Kind::pg).collect();
        let n = blocking(|| {
            futures_executor::block_on(async {
                let statement = client.prepare_typed_cached(sql, &types).await?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                client.execute(&statement, &refs).await
            })
        })
        .map_err(|e| {
            tracing::debug!("PostgreSQL statement failed: {}: {sql}", pg_error(&e));
            SqlError::from(e)
        })?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Runs a statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize> {
        let params = params.into_values();
        match &self.inner {
            Inner::Sqlite(conn) => blocking(|| {
                let mut stmt = conn.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter().map(sqlite_value)))?)
            }),
            Inner::Postgres { .. } => self.pg_execute(sql, params),
        }
    }

    /// Every row of a query.
    pub fn query_all(&self, sql: &str, params: impl Params) -> Result<Vec<Row>> {
        let params = params.into_values();
        match &self.inner {
            Inner::Sqlite(conn) => blocking(|| {
                let mut stmt = conn.prepare_cached(for_sqlite(sql))?;
                let columns = stmt.column_count();
                let mut rows =
                    stmt.query(rusqlite::params_from_iter(params.iter().map(sqlite_value)))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let mut values = Vec::with_capacity(columns);
                    for i in 0..columns {
                        values.push(match row.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => Value::Null(Kind::Text),
                            rusqlite::types::ValueRef::Integer(i) => Value::Int(i),
                            rusqlite::types::ValueRef::Real(f) => Value::Real(f),
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                        });
                    }
                    out.push(Row { values });
                }
                Ok(out)
            }),
            Inner::Postgres { .. } => self
                .pg_query(sql, params)?
                .iter()
                .map(pg_row)
                .collect::<Result<Vec<_>>>(),
        }
    }

    /// The first row, mapped; [`SqlError::NoRows`] when there is none.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        let rows = self.query_all(sql, params)?;
        f(rows.first().ok_or(SqlError::NoRows)?)
    }

    /// A statement to run several times (SQLite caches it prepared, the
    /// pool's connections too).
    pub fn prepare(&self, sql: &str) -> Result<Stmt<'_, 'a>> {
        Ok(Stmt {
            conn: self,
            sql: sql.to_owned(),
        })
    }

    /// As [`Conn::prepare`].
    pub fn prepare_cached(&self, sql: &str) -> Result<Stmt<'_, 'a>> {
        self.prepare(sql)
    }

    /// Several statements, no parameters (schemas).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &self.inner {
            Inner::Sqlite(conn) => blocking(|| Ok(conn.execute_batch(sql)?)),
            Inner::Postgres { client, .. } => {
                blocking(|| futures_executor::block_on(client.batch_execute(sql)))?;
                Ok(())
            }
        }
    }

    /// A write transaction that sees and changes the database alone, as
    /// SQLite's `BEGIN IMMEDIATE`: on PostgreSQL every such transaction of
    /// every instance takes one transaction-scoped advisory lock first, so
    /// read-check-write sequences (the last vote, the last owner, a use of
    /// an enrollment token) cannot interleave across instances.
    pub fn transaction(&mut self) -> Result<Tx<'_, 'a>> {
        self.begin(true)
    }

    /// A transaction that does not serialize with the others: all or
    /// nothing, for writes whose correctness rests on row locks and unique
    /// keys alone (the audit upload, idempotent on (agent, seq)).
    pub fn transaction_concurrent(&mut self) -> Result<Tx<'_, 'a>> {
        self.begin(false)
    }

    fn begin(&mut self, exclusive: bool) -> Result<Tx<'_, 'a>> {
        match &self.inner {
            Inner::Sqlite(_) => self.execute_batch("BEGIN IMMEDIATE")?,
            Inner::Postgres { .. } if exclusive => self.execute_batch(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({WRITER_LOCK})"
            ))?,
            Inner::Postgres { .. } => self.execute_batch("BEGIN")?,
        }
        Ok(Tx {
            conn: self,
            done: false,
        })
    }

    /// The PostgreSQL pool behind this connection, if any.
    pub fn pg(&self) -> Option<&'a Pg> {
        match &self.inner {
            Inner::Postgres { pg, .. } => Some(pg),
            Inner::Sqlite(_) => None,
        }
    }
}

/// The advisory lock key of exclusive write transactions ("epm-wr").
pub const WRITER_LOCK: i64 = 0x6570_6d2d_7772;
/// The advisory lock key of the expiry sweep ("epm-sw").
pub const SWEEP_LOCK: i64 = 0x6570_6d2d_7377;

/// SQLite locks the whole database for a write transaction: a row lock
/// (`FOR UPDATE`, PostgreSQL's) is implied there and not in its grammar.
fn for_sqlite(sql: &str) -> &str {
    sql.strip_suffix(" FOR UPDATE").unwrap_or(sql)
}

fn sqlite_value(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Null(_) => rusqlite::types::Value::Null,
        Value::Int(i) => rusqlite::types::Value::Integer(*i),
        Value::Real(f) => rusqlite::types::Value::Real(*f),
        Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Value::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
    }
}

/// A prepared statement.
#[allow(missing_debug_implementations)]
pub struct Stmt<'c, 'a> {
    conn: &'c Conn<'a>,
    sql: String,
}

impl Stmt<'_, '_> {
    /// Every row, mapped.
    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        Ok(self
            .conn
            .query_all(&self.sql, params)?
            .iter()
            .map(&mut f)
            .collect::<Vec<_>>()
            .into_iter())
    }

    /// The first row, mapped.
    pub fn query_row<T>(
        &mut self,
        params: impl Params,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        self.conn.query_row(&self.sql, params, f)
    }

    /// Runs it; returns the rows changed.
    pub fn execute(&mut self, params: impl Params) -> Result<usize> {
        self.conn.execute(&self.sql, params)
    }
}

/// A transaction; rolled back when dropped uncommitted.
#[allow(missing_debug_implementations)]
pub struct Tx<'c, 'a> {
    conn: &'c mut Conn<'a>,
    done: bool,
}

impl Tx<'_, '_> {
    /// Commits.
    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        self.conn.execute_batch("COMMIT")
    }
}

impl<'a> std::ops::Deref for Tx<'_, 'a> {
    type Target = Conn<'a>;
    fn deref(&self) -> &Conn<'a> {
        self.conn
    }
}

impl Drop for Tx<'_, '_> {
    fn drop(&mut self) {
        if !self.done {
            // A failed rollback leaves SQLite to roll back at the next
            // BEGIN and PostgreSQL's pool to discard nothing it needs:
            // the connection is in an aborted transaction that the next
            // BEGIN would report. Say so.
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::warn!("rolling back a transaction: {e}");
            }
        }
    }
}

/// Shared notification of changes made by any instance: called with the
/// channel (`audit`, `requests`) and the notification's payload (for
/// `requests`, the agent whose request changed; empty when anything on the
/// channel may have changed, as after the listener reconnects).
pub type Listener = Arc<dyn Fn(&str, &str) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_quotes_only() {
        assert_eq!(
            translate("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND \"d?\" = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND \"d?\" = $12"
        );
    }

    #[test]
    fn sqlite_functions_are_rewritten_with_their_arguments() {
        assert_eq!(
            translate("WHERE julianday(json_extract(record, '$.time')) >= julianday(?7)"),
            "WHERE CAST(CAST((record::jsonb ->> 'time') AS TEXT) AS timestamptz) >= CAST(CAST($7 AS TEXT) AS timestamptz)"
        );
        assert_eq!(
            translate("DELETE FROM t WHERE rowid IN (SELECT rowid FROM t LIMIT -1 OFFSET ?1)"),
            "DELETE FROM t WHERE ctid IN (SELECT ctid FROM t LIMIT ALL OFFSET $1)"
        );
        // An unbalanced call is left as it is rather than cut.
        assert_eq!(translate("SELECT julianday(x"), "SELECT julianday(x");
    }

    #[test]
    fn a_url_in_a_message_hides_its_password() {
        assert_eq!(
            redact("postgres://epm:s3cret@db.internal:5432/epm"),
            "postgres://epm:***@db.internal:5432/epm"
        );
        assert_eq!(
            redact("postgres://epm@db.internal/epm"),
            "postgres://epm@db.internal/epm"
        );
    }

    #[test]
    fn nulls_keep_their_kind_and_values_convert_back() {
        assert_eq!(None::<u64>.to_value(), Value::Null(Kind::Int));
        assert_eq!(None::<&str>.to_value(), Value::Null(Kind::Text));
        assert_eq!(Some(3u32).to_value(), Value::Int(3));
        assert_eq!(u64::MAX.to_value(), Value::Int(i64::MAX), "saturates");
        let row = Row {
            values: vec![
                Value::Int(-1),
                Value::Null(Kind::Text),
                Value::Text("x".into()),
            ],
        };
        assert!(row.get::<_, u32>(0).is_err(), "a negative is no u32");
        assert_eq!(row.get::<_, Option<String>>(1).unwrap(), None);
        assert!(row.get::<_, i64>(2).is_err(), "text is no integer");
        assert!(row.get::<_, String>(3).is_err(), "no such column");
    }
}

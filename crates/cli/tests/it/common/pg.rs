//! A PostgreSQL for the tests: the server on 127.0.0.1:5432, database `test` (or
//! `AGENTRY_TEST_POSTGRES_URL`), each test in a schema of its own, dropped after it.

pub fn pg_url() -> String {
    std::env::var("AGENTRY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema, dropped with the guard; the tables are created by the first node that
/// starts on it.
pub struct Schema(String);

pub fn schema() -> Schema {
    Schema(format!(
        "agentry_it_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    ))
}

impl std::ops::Deref for Schema {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let drop_it = sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
        // From a runtime of its own: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&pg_url()).await {
                    let _ = sqlx::raw_sql(drop_it).execute(&mut c).await;
                }
            });
        })
        .join();
    }
}

pub fn on_postgres(schema: &str) -> Vec<String> {
    vec![
        "--database".into(),
        pg_url(),
        "--database-schema".into(),
        schema.into(),
    ]
}

//! Proves PostgreSQL is really reached: a fresh database per test, a table
//! written and read back through sqlx.

use keel_integration_tests::TestDatabase;

#[tokio::test]
async fn a_row_round_trips_in_a_fresh_database() {
    let db = TestDatabase::create().await;
    let pool = db.pool();
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(current, db.name());
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(tables, 0, "a fresh database starts empty");

    sqlx::query("CREATE TABLE events (id bigint PRIMARY KEY, body text NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO events VALUES ($1, $2)")
        .bind(1_i64)
        .bind("committed")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO events VALUES ($1, $2)")
        .bind(2_i64)
        .bind("rolled back")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, body FROM events ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, "committed".to_owned())]);
}

#[tokio::test]
async fn each_test_database_is_dropped_afterwards() {
    let db = TestDatabase::create().await;
    let name = db.name().to_owned();
    let server = keel_integration_tests::postgres_url().await;
    drop(db);
    let pool = sqlx::PgPool::connect(&server).await.unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!exists, "{name} was not dropped");
}

//! How fast sled itself makes one small insert durable (insert + flush in a
//! loop, one thread): the floor under easel's single-appender acceptance.
//! `cargo run --release --example raw_flush`

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new().path(dir.path()).open()?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut n = 0u64;
    while std::time::Instant::now() < until {
        db.insert(n.to_be_bytes(), vec![0u8; 300])?;
        db.flush()?;
        n += 1;
    }
    println!("sled insert + flush, one thread: {:.0}/s", n as f64 / 3.0);
    Ok(())
}

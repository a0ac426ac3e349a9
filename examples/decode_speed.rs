//! Decode speed of stored records (the replay's ceiling), on the v1 fixture.
//! `cargo run --release --example decode_speed`

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lines: Vec<Vec<u8>> = include_str!("../tests/fixtures/events-v1.jsonl")
        .lines()
        .map(|l| l.as_bytes().to_vec())
        .collect();
    let sealed: Vec<Vec<u8>> = lines
        .iter()
        .map(|l| easel::store::codec::seal(l))
        .collect::<Result<_, _>>()?;
    let n = 1_000_000;
    let t = std::time::Instant::now();
    for i in 0..n {
        let rec =
            easel::store::codec::decode(&sealed[i % sealed.len()]).map_err(|e| e.to_string())?;
        std::hint::black_box(rec);
    }
    println!(
        "decode: {:.0} records/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

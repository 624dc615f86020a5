use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Instant;

#[tokio::main]
async fn main() {
    let topic = ferrybox::testing::create_topic(3).await;
    let producer: FutureProducer =
        ferrybox::kafka::durable_producer(&ferrybox::testing::kafka()).unwrap();
    for i in 0..15 {
        let t = Instant::now();
        let k = format!("k{i}");
        producer
            .send_result(FutureRecord::to(&topic).key(&k).payload("x"))
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        print!("{:.1} ", t.elapsed().as_secs_f64() * 1000.0);
    }
    println!();
}

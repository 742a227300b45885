mod common;

#[test]
fn health_answers_ok() {
    let server = common::Server::start();
    let response = common::client()
        .get(server.url("/health"))
        .send()
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().expect("body"), r#"{"status":"OK"}"#);
}

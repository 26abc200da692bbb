//! Replays the ext fuzz target's committed corpus (fuzz/corpus/ext_image) through
//! the same harness, without libFuzzer: every input must end in data or an error,
//! never a panic. Keeps what the long fuzz runs found covered in the normal suite.

#[path = "../../../fuzz/src/lib.rs"]
mod harness;

#[test]
fn fuzz_corpus_replays_without_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/ext_image");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // (A fuzzer running on the corpus may remove entries meanwhile.)
        let Ok(input) = std::fs::read(&path) else {
            continue;
        };
        harness::ext_image(&input);
        n += 1;
    }
    assert!(n >= 4, "the corpus has {n} inputs");
}

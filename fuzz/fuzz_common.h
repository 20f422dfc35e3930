// Shared by the libFuzzer harnesses and the seed generator: the oracle check that aborts and
// the record framing of the message-sequence harnesses. No gRPC (received_message.h has it).
#ifndef SIMSERVE_FUZZ_FUZZ_COMMON_H_
#define SIMSERVE_FUZZ_FUZZ_COMMON_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace simserve::fuzz {

// An oracle's verdict: prints `what` and aborts (libFuzzer then saves the input) unless `ok`.
inline void Check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz check failed: %s\n", what);
  std::abort();
}

// Input of the message-sequence harnesses (upload_fuzzer, gallery_fuzzer): one options
// byte, then records [kind: 1 byte][length: 2 bytes little-endian][length bytes]. The
// kind's low 2 bits say what the record is (per harness); bits 2-3 + 1 are the number of
// slices the message arrives in. A truncated last record is cut to the bytes present.
struct Record {
  uint8_t kind = 0;
  std::string_view payload;
  int slices() const { return ((kind >> 2) & 3) + 1; }
};
struct Framed {
  uint8_t options = 0;
  std::vector<Record> records;
};

inline Framed ParseFramed(const uint8_t* data, size_t size) {
  Framed framed;
  if (size == 0) return framed;
  framed.options = data[0];
  size_t at = 1;
  while (at + 3 <= size) {
    Record record{.kind = data[at]};
    const size_t length = data[at + 1] | (size_t{data[at + 2]} << 8);
    at += 3;
    const size_t take = length < size - at ? length : size - at;
    record.payload = {reinterpret_cast<const char*>(data + at), take};
    framed.records.push_back(record);
    at += take;
  }
  return framed;
}

// The inverse of ParseFramed for one record (the seed generator). `payload` must be shorter
// than 64 KiB.
inline void AppendRecord(std::string* out, uint8_t kind, std::string_view payload) {
  out->push_back(static_cast<char>(kind));
  out->push_back(static_cast<char>(payload.size() & 0xff));
  out->push_back(static_cast<char>((payload.size() >> 8) & 0xff));
  out->append(payload);
}

}  // namespace simserve::fuzz

#endif  // SIMSERVE_FUZZ_FUZZ_COMMON_H_

// Trajectory arena core (b2kernels._C.Arena): byte layout, indices, per-trajectory metadata, threaded
// gather/scatter with the GIL released, and atomic checksummed save/load. Torch-free; the Python facade
// (b2kernels/buffer/arena.py) owns dtypes, devices, streams and pinning. The pure-torch twin
// (b2kernels/buffer/_python.py) has the same layout and file format and is the test oracle.
//
// Layout: one contiguous, page-aligned block of capacity_slots * latent_nbytes bytes. A tree with split s
// owns one contiguous segment [prefix: latents 0..s][branch 0: latents s+1..T]...[branch B-1], carved by a
// bump pointer (reset rewinds it). Trajectory j is branch j % B of tree j / B. Capacity is the worst case,
// max_trees * (1 + B*T) latents (split 0), so add_trees only fails when max_trees is reached.
//
// Errors: an index out of range (trajectory id, latent index, step) throws std::out_of_range (IndexError in
// Python, as the b2kernels ops raise for step_idx / ref_index); any other bad argument std::invalid_argument
// (ValueError); reading a latent that no write_latents stored since its tree was added std::runtime_error
// (RuntimeError) instead of returning whatever an earlier tree left in that slot.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = int64_t;
using IdArray = py::array_t<i64, py::array::c_style | py::array::forcecast>;
using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

constexpr char kMagic[8] = {'B', '2', 'K', 'A', 'R', 'E', 'N', 'A'};
constexpr uint32_t kVersion = 1;
constexpr size_t kPage = 4096;

std::string fmt_shape(const std::vector<i64>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// ---- CRC-32 (IEEE, reflected; identical to zlib.crc32), slicing-by-8 ----------------------------------
struct Crc32 {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Crc32() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
  uint32_t update(uint32_t crc, const uint8_t* p, size_t n) const {
    crc = ~crc;
    while (n >= 8) {
      uint32_t a, b;
      std::memcpy(&a, p, 4);  // little-endian hosts only (x86-64, aarch64)
      std::memcpy(&b, p + 4, 4);
      a ^= crc;
      crc = t[7][a & 0xFF] ^ t[6][(a >> 8) & 0xFF] ^ t[5][(a >> 16) & 0xFF] ^ t[4][a >> 24] ^
            t[3][b & 0xFF] ^ t[2][(b >> 8) & 0xFF] ^ t[1][(b >> 16) & 0xFF] ^ t[0][b >> 24];
      p += 8;
      n -= 8;
    }
    while (n--) crc = t[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
  }
};
const Crc32& crc_table() {
  static const Crc32 c;
  return c;
}

// Run fn(begin, end) over [0, n) on up to `threads` threads (the caller's thread included).
template <class F>
void parallel_rows(i64 n, int threads, i64 bytes_per_row, F&& fn) {
  // below ~256 KiB a thread start costs more than the copy it saves
  i64 by_size = std::max<i64>(1, (n * bytes_per_row) / (256 << 10));
  int nt = static_cast<int>(std::min<i64>({static_cast<i64>(threads), n, by_size}));
  if (nt <= 1) {
    fn(i64{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  i64 chunk = (n + nt - 1) / nt;
  for (int t = 1; t < nt; ++t) {
    i64 b = t * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(i64{0}, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

bool contiguous(const py::buffer_info& info) {
  i64 expect = info.itemsize;
  for (i64 d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expect) return false;
    expect *= info.shape[d];
  }
  return true;
}

// A writable, C-contiguous destination given through the buffer protocol (numpy array, memoryview, ...).
uint8_t* out_ptr(py::buffer& buf, size_t want_bytes, const char* name) {
  py::buffer_info info = buf.request(true);
  if (info.readonly) throw std::invalid_argument(std::string(name) + ": buffer is read-only");
  if (!contiguous(info)) throw std::invalid_argument(std::string(name) + ": buffer must be C-contiguous");
  size_t have = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  if (have != want_bytes)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(want_bytes) +
                                " bytes, got " + std::to_string(have));
  return static_cast<uint8_t*>(info.ptr);
}

class Arena {
 public:
  Arena(std::vector<i64> shape, i64 elem_size, uint32_t dtype_code, i64 num_steps, i64 max_trees,
        i64 branches, int num_threads)
      : shape_(std::move(shape)), elem_size_(elem_size), dtype_code_(dtype_code), T_(num_steps),
        max_trees_(max_trees), B_(branches) {
    if (shape_.empty() || shape_.size() > 8 || elem_size_ <= 0)
      throw std::invalid_argument("latent shape must have 1..8 positive dims and elem_size > 0, got " +
                                  fmt_shape(shape_));
    nbytes_ = elem_size_;
    for (i64 d : shape_) {
      if (d <= 0) throw std::invalid_argument("latent shape must be positive, got " + fmt_shape(shape_));
      nbytes_ *= d;
    }
    if (T_ <= 0 || max_trees_ <= 0 || B_ <= 0)
      throw std::invalid_argument("num_steps, max_trees and branches must be >= 1");
    capacity_slots_ = max_trees_ * (1 + B_ * T_);
    size_t bytes = static_cast<size_t>(capacity_slots_) * static_cast<size_t>(nbytes_);
    alloc_bytes_ = (bytes + kPage - 1) / kPage * kPage;  // page-aligned for cudaHostRegister
    mem_ = static_cast<uint8_t*>(std::aligned_alloc(kPage, alloc_bytes_));
    if (!mem_) throw std::bad_alloc();
    std::memset(mem_, 0, alloc_bytes_);
    written_.assign(capacity_slots_, 0);
    tree_prompt_.assign(max_trees_, 0);
    tree_split_.assign(max_trees_, 0);
    tree_offset_.assign(max_trees_, 0);
    reward_.assign(max_trees_ * B_, NAN);
    adv_.assign(max_trees_ * B_, NAN);
    logp_.assign(max_trees_ * B_ * T_, NAN);
    unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    threads_ = num_threads > 0 ? num_threads : static_cast<int>(std::min(8u, hw));
  }
  ~Arena() { std::free(mem_); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // ---- sizes ------------------------------------------------------------------------------------------
  i64 latent_nbytes() const { return nbytes_; }
  i64 capacity_slots() const { return capacity_slots_; }
  i64 used_slots() const { return used_slots_; }
  i64 num_trees() const { return num_trees_; }
  i64 num_trajectories() const { return num_trees_ * B_; }
  int threads() const { return threads_; }
  void set_threads(int n) {
    if (n < 1) throw std::invalid_argument("num_threads must be >= 1");
    threads_ = n;
  }
  uint8_t* data() const { return mem_; }
  size_t data_bytes() const { return static_cast<size_t>(capacity_slots_ * nbytes_); }

  // ---- layout -----------------------------------------------------------------------------------------
  i64 slot(i64 j, i64 i) const {
    i64 tree = j / B_, b = j % B_, s = tree_split_[tree], off = tree_offset_[tree];
    return i <= s ? off + i : off + (s + 1) + b * (T_ - s) + (i - s - 1);
  }

  void check_ids(const i64* ids, i64 m) const {
    i64 n = num_trajectories();
    for (i64 k = 0; k < m; ++k)
      if (ids[k] < 0 || ids[k] >= n)
        throw std::out_of_range("trajectory id " + std::to_string(ids[k]) + " out of range: the arena holds " +
                                    std::to_string(n) + " trajectories (ids 0.." + std::to_string(n - 1) + ")");
  }
  void check_latent_idx(i64 i) const {
    if (i < 0 || i > T_)
      throw std::out_of_range("latent index out of range: expected 0.." + std::to_string(T_) + " (T=" +
                                  std::to_string(T_) + "), got " + std::to_string(i));
  }
  // Under the caller's lock: every slot a read touches must have been written since its tree was added.
  void check_written(i64 j, i64 i) const {
    if (!written_[slot(j, i)])
      throw std::runtime_error("latent " + std::to_string(i) + " of trajectory " + std::to_string(j) +
                               " was not written since its tree was added (the slot holds stale data); "
                               "write_latents it before reading or gathering");
  }
  // Under the caller's lock (shared to read, unique to write): check the ids and the latent index, then call
  // copy(k, pointer to latent `latent_idx` of trajectory ids[k]) for every k < m, rows split over the threads.
  template <class F>
  void each_latent(const i64* id, i64 m, i64 latent_idx, F&& copy) const {
    check_ids(id, m);
    check_latent_idx(latent_idx);
    parallel_rows(m, threads_, nbytes_, [&](i64 b, i64 e) {
      for (i64 k = b; k < e; ++k) copy(k, mem_ + slot(id[k], latent_idx) * nbytes_);
    });
  }
  void check_len(const char* name, i64 got, i64 m) const {
    if (got != m)
      throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(m) + " values, got " +
                                  std::to_string(got));
  }

  py::array_t<i64> slots(IdArray ids, IdArray latent_idx) const {
    std::shared_lock lk(mu_);
    i64 m = ids.size();
    check_len("latent_idx", latent_idx.size(), m);
    const i64 *id = ids.data(), *li = latent_idx.data();
    check_ids(id, m);
    for (i64 k = 0; k < m; ++k) check_latent_idx(li[k]);
    py::array_t<i64> out(m);
    i64* o = out.mutable_data();
    for (i64 k = 0; k < m; ++k) o[k] = slot(id[k], li[k]);
    return out;
  }

  i64 add_trees(IdArray prompt_ids, i64 s) {
    std::unique_lock lk(mu_);
    i64 p = prompt_ids.size();
    if (s < 0 || s > T_)
      throw std::invalid_argument("split_step must be in [0, T=" + std::to_string(T_) + "], got " + std::to_string(s));
    if (num_trees_ + p > max_trees_)
      throw std::invalid_argument("arena full: it holds " + std::to_string(num_trees_) + " of max_trees=" +
                                  std::to_string(max_trees_) + " trees and cannot add " + std::to_string(p) +
                                  " more; call reset() or build a larger arena");
    i64 size = (s + 1) + B_ * (T_ - s);
    if (used_slots_ + p * size > capacity_slots_)
      throw std::invalid_argument("arena full: " + std::to_string(used_slots_) + " of " +
                                  std::to_string(capacity_slots_) + " latent slots used");
    const i64* pr = prompt_ids.data();
    for (i64 k = 0; k < p; ++k) {
      i64 t = num_trees_ + k;
      tree_prompt_[t] = pr[k];
      tree_split_[t] = s;
      tree_offset_[t] = used_slots_ + k * size;
    }
    std::fill(reward_.begin() + num_trees_ * B_, reward_.begin() + (num_trees_ + p) * B_, NAN);
    std::fill(adv_.begin() + num_trees_ * B_, adv_.begin() + (num_trees_ + p) * B_, NAN);
    std::fill(logp_.begin() + num_trees_ * B_ * T_, logp_.begin() + (num_trees_ + p) * B_ * T_, NAN);
    std::fill(written_.begin() + used_slots_, written_.begin() + used_slots_ + p * size, 0);
    i64 first = num_trees_ * B_;
    num_trees_ += p;
    used_slots_ += p * size;
    return first;
  }

  void reset() {
    std::unique_lock lk(mu_);
    num_trees_ = 0;
    used_slots_ = 0;
  }

  // ---- latents ----------------------------------------------------------------------------------------
  void write_latents(IdArray ids, i64 latent_idx, py::buffer src) {
    i64 m = ids.size();
    py::buffer_info info = src.request();
    if (static_cast<i64>(info.size * info.itemsize) != m * nbytes_)
      throw std::invalid_argument("latents: expected " + std::to_string(m * nbytes_) + " bytes (" +
                                  std::to_string(m) + " latents), got " + std::to_string(info.size * info.itemsize));
    if (!contiguous(info)) throw std::invalid_argument("latents: buffer must be C-contiguous");
    const uint8_t* in = static_cast<const uint8_t*>(info.ptr);
    const i64* id = ids.data();
    // GIL released before the lock is taken and the lock dropped before the GIL comes back: no lock-order deadlock
    py::gil_scoped_release nogil;
    std::unique_lock lk(mu_);
    each_latent(id, m, latent_idx, [&](i64 k, uint8_t* latent) { std::memcpy(latent, in + k * nbytes_, nbytes_); });
    for (i64 k = 0; k < m; ++k) written_[slot(id[k], latent_idx)] = 1;
  }

  // Record that the caller filled these slots itself (the facade's asynchronous device-to-host copies write
  // through the buffer protocol, not through write_latents).
  void mark_written(IdArray slot_ids) {
    std::unique_lock lk(mu_);
    i64 m = slot_ids.size();
    const i64* sl = slot_ids.data();
    for (i64 k = 0; k < m; ++k)
      if (sl[k] < 0 || sl[k] >= used_slots_)
        throw std::out_of_range("slot " + std::to_string(sl[k]) + " out of range: " + std::to_string(used_slots_) +
                                " slots in use");
    for (i64 k = 0; k < m; ++k) written_[sl[k]] = 1;
  }

  void read_latents(IdArray ids, i64 latent_idx, py::buffer dst) const {
    i64 m = ids.size();
    uint8_t* out = out_ptr(dst, static_cast<size_t>(m * nbytes_), "out");
    const i64* id = ids.data();
    py::gil_scoped_release nogil;
    std::shared_lock lk(mu_);
    check_ids(id, m);
    check_latent_idx(latent_idx);
    for (i64 k = 0; k < m; ++k) check_written(id[k], latent_idx);
    each_latent(id, m, latent_idx, [&](i64 k, uint8_t* latent) { std::memcpy(out + k * nbytes_, latent, nbytes_); });
  }

  // ---- scalars ----------------------------------------------------------------------------------------
  void write_logprobs(IdArray ids, i64 step, F32Array values) {
    std::unique_lock lk(mu_);
    i64 m = ids.size();
    check_len("logprob", values.size(), m);
    const i64* id = ids.data();
    const float* v = values.data();
    check_ids(id, m);
    if (step < 0 || step >= T_)
      throw std::out_of_range("step must be in [0, T=" + std::to_string(T_) + "), got " + std::to_string(step));
    for (i64 k = 0; k < m; ++k) {
      i64 tree = id[k] / B_;
      if (step < tree_split_[tree]) {  // both latents of the step are in the shared prefix
        for (i64 b = 0; b < B_; ++b) logp_[(tree * B_ + b) * T_ + step] = v[k];
      } else {
        logp_[id[k] * T_ + step] = v[k];
      }
    }
  }

  void set_rewards(IdArray ids, F32Array v) { set(reward_, "rewards", ids, v); }
  void set_advantages(IdArray ids, F32Array v) { set(adv_, "advantages", ids, v); }

  py::array_t<i64> prompt_ids(IdArray ids) const {
    return per_traj<i64>(ids, [&](i64 j) { return tree_prompt_[j / B_]; });
  }
  py::array_t<i64> split_steps(IdArray ids) const {
    return per_traj<i64>(ids, [&](i64 j) { return tree_split_[j / B_]; });
  }
  py::array_t<float> rewards(IdArray ids) const {
    return per_traj<float>(ids, [&](i64 j) { return reward_[j]; });
  }
  py::array_t<float> advantages(IdArray ids) const {
    return per_traj<float>(ids, [&](i64 j) { return adv_[j]; });
  }
  py::array_t<float> logprobs(IdArray ids) const {
    std::shared_lock lk(mu_);
    i64 m = ids.size();
    check_ids(ids.data(), m);
    py::array_t<float> out({m, T_});
    float* o = out.mutable_data();
    for (i64 k = 0; k < m; ++k) std::memcpy(o + k * T_, logp_.data() + ids.data()[k] * T_, T_ * sizeof(float));
    return out;
  }

  // ---- gather -----------------------------------------------------------------------------------------
  void gather(IdArray ids, IdArray steps, py::buffer out_xt, py::buffer out_xprev, py::buffer out_logp,
              py::buffer out_reward, py::buffer out_adv, py::buffer out_step, py::buffer out_prompt) const {
    i64 m = ids.size();
    check_len("steps", steps.size(), m);
    size_t ml = static_cast<size_t>(m * nbytes_);
    uint8_t* xt = out_ptr(out_xt, ml, "out_xt");
    uint8_t* xp = out_ptr(out_xprev, ml, "out_xprev");
    auto* lp = reinterpret_cast<float*>(out_ptr(out_logp, m * 4, "out_logp"));
    auto* rw = reinterpret_cast<float*>(out_ptr(out_reward, m * 4, "out_reward"));
    auto* ad = reinterpret_cast<float*>(out_ptr(out_adv, m * 4, "out_adv"));
    auto* st = reinterpret_cast<i64*>(out_ptr(out_step, m * 8, "out_step"));
    auto* pr = reinterpret_cast<i64*>(out_ptr(out_prompt, m * 8, "out_prompt"));
    const i64 *id = ids.data(), *sp = steps.data();
    py::gil_scoped_release nogil;
    std::shared_lock lk(mu_);
    check_ids(id, m);
    for (i64 k = 0; k < m; ++k)
      if (sp[k] < 0 || sp[k] >= T_)
        throw std::out_of_range("step out of range: expected 0.." + std::to_string(T_ - 1) + " (T=" +
                                    std::to_string(T_) + "), got " + std::to_string(sp[k]));
    for (i64 k = 0; k < m; ++k) {
      check_written(id[k], sp[k]);
      check_written(id[k], sp[k] + 1);
    }
    parallel_rows(m, threads_, 2 * nbytes_, [&](i64 b, i64 e) {
      for (i64 k = b; k < e; ++k) {
        i64 j = id[k], i = sp[k];
        std::memcpy(xt + k * nbytes_, mem_ + slot(j, i) * nbytes_, nbytes_);
        std::memcpy(xp + k * nbytes_, mem_ + slot(j, i + 1) * nbytes_, nbytes_);
        lp[k] = logp_[j * T_ + i];
        rw[k] = reward_[j];
        ad[k] = adv_[j];
        st[k] = i;
        pr[k] = tree_prompt_[j / B_];
      }
    });
  }

  // ---- persistence ------------------------------------------------------------------------------------
  void save(const std::string& path) const {
    py::gil_scoped_release nogil;
    std::shared_lock lk(mu_);
    std::vector<uint8_t> head = header(num_trees_, used_slots_);
    size_t nt = static_cast<size_t>(num_trees_), n = nt * static_cast<size_t>(B_), T = static_cast<size_t>(T_);
    struct Chunk {
      const void* p;
      size_t n;
    };
    const Chunk chunks[] = {{head.data(), head.size()},
                            {tree_prompt_.data(), nt * 8u},
                            {tree_split_.data(), nt * 8u},
                            {tree_offset_.data(), nt * 8u},
                            {reward_.data(), n * 4u},
                            {adv_.data(), n * 4u},
                            {logp_.data(), n * T * 4u},
                            {mem_, static_cast<size_t>(used_slots_ * nbytes_)}};
    std::string tmp = path + ".tmp." + std::to_string(::getpid());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw std::runtime_error("save: cannot create " + tmp + ": " + std::strerror(errno));
    uint32_t crc = 0;
    auto fail = [&](const char* what) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw std::runtime_error(std::string("save: ") + what + " " + tmp + ": " + std::strerror(err));
    };
    auto put = [&](const void* p, size_t len) {
      const uint8_t* c = static_cast<const uint8_t*>(p);
      while (len) {
        ssize_t w = ::write(fd, c, std::min<size_t>(len, size_t{1} << 30));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail("write to");
        c += w;
        len -= static_cast<size_t>(w);
      }
    };
    for (const auto& c : chunks) {
      crc = crc_table().update(crc, static_cast<const uint8_t*>(c.p), c.n);
      put(c.p, c.n);
    }
    put(&crc, 4);
    if (::fsync(fd) != 0) fail("fsync of");
    if (::close(fd) != 0) {
      ::unlink(tmp.c_str());
      throw std::runtime_error("save: close of " + tmp + " failed: " + std::strerror(errno));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      int err = errno;
      ::unlink(tmp.c_str());
      throw std::runtime_error("save: rename " + tmp + " -> " + path + ": " + std::strerror(err));
    }
    std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/') + 1);
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);  // make the rename durable
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }

  void load(const std::string& path) {
    std::vector<uint8_t> data;
    {
      py::gil_scoped_release nogil;
      data = read_file(path);
    }
    // validate everything before touching the arena
    size_t off = 0;
    auto need = [&](size_t n, const char* what) {
      if (data.size() < off + n)
        throw std::invalid_argument(path + ": truncated arena file (" + std::to_string(data.size()) + " bytes, " +
                                    what + " incomplete)");
    };
    auto u32 = [&]() { uint32_t v; need(4, "header"); std::memcpy(&v, data.data() + off, 4); off += 4; return v; };
    auto u64 = [&]() { uint64_t v; need(8, "header"); std::memcpy(&v, data.data() + off, 8); off += 8; return v; };
    if (data.size() < 8 || std::memcmp(data.data(), kMagic, 8) != 0)
      throw std::invalid_argument(path + ": not a b2kernels arena file (bad magic; expected b'B2KARENA' at offset 0)");
    off = 8;
    uint32_t version = u32();
    if (version != kVersion)
      throw std::invalid_argument(path + ": arena file format version " + std::to_string(version) +
                                  ", this build reads version " + std::to_string(kVersion));
    uint32_t dtype_code = u32();
    uint64_t elem_size = u64(), ndim = u64();
    if (ndim > 8) throw std::invalid_argument(path + ": corrupted header (ndim=" + std::to_string(ndim) + ")");
    std::vector<i64> shape(ndim);
    for (auto& d : shape) d = static_cast<i64>(u64());
    uint64_t T = u64(), file_max_trees = u64(), B = u64(), nt = u64(), used = u64(), payload = u64();
    (void)file_max_trees;
    // sizes first in a way that cannot overflow: every count must fit the file
    if (nt > data.size() || B > data.size() || T > data.size() || used > data.size())
      throw std::invalid_argument(path + ": corrupted header (counts larger than the file)");
    i64 lat_bytes = elem_size;
    for (i64 d : shape) lat_bytes = (d > 0 && lat_bytes <= (i64{1} << 40) / d) ? lat_bytes * d : -1;
    if (lat_bytes <= 0) throw std::invalid_argument(path + ": corrupted header (latent shape " + fmt_shape(shape) + ")");
    uint64_t n = nt * B;
    uint64_t expect = 24 * nt + 8 * n + 4 * n * T + used * static_cast<uint64_t>(lat_bytes);
    if (payload != expect)
      throw std::invalid_argument(path + ": corrupted header (payload length " + std::to_string(payload) +
                                  " does not match the counts)");
    size_t total = off + payload + 4;
    if (data.size() != total)
      throw std::invalid_argument(path + ": truncated or padded arena file: " + std::to_string(data.size()) +
                                  " bytes, header says " + std::to_string(total));
    uint32_t stored;
    std::memcpy(&stored, data.data() + total - 4, 4);
    uint32_t actual = crc_table().update(0, data.data(), total - 4);
    if (stored != actual) {
      char msg[96];
      std::snprintf(msg, sizeof msg, "checksum mismatch (stored %#010x, computed %#010x)", stored, actual);
      throw std::invalid_argument(path + ": " + msg + ": file is corrupted");
    }
    if (dtype_code != dtype_code_ || static_cast<i64>(elem_size) != elem_size_ || shape != shape_ ||
        static_cast<i64>(T) != T_ || static_cast<i64>(B) != B_)
      throw std::invalid_argument(path + ": arena file has (dtype code, elem size, latent shape, T, B) = (" +
                                  std::to_string(dtype_code) + ", " + std::to_string(elem_size) + ", " +
                                  fmt_shape(shape) + ", " + std::to_string(T) + ", " + std::to_string(B) +
                                  "), this arena has (" + std::to_string(dtype_code_) + ", " +
                                  std::to_string(elem_size_) + ", " + fmt_shape(shape_) + ", " +
                                  std::to_string(T_) + ", " + std::to_string(B_) + ")");
    if (static_cast<i64>(nt) > max_trees_ || static_cast<i64>(used) > capacity_slots_)
      throw std::invalid_argument(path + ": file holds " + std::to_string(nt) + " trees, this arena fits max_trees=" +
                                  std::to_string(max_trees_));
    const uint8_t* p = data.data() + off;
    std::vector<i64> prompt(nt), split(nt), offset(nt);
    std::memcpy(prompt.data(), p, nt * 8);
    std::memcpy(split.data(), p + nt * 8, nt * 8);
    std::memcpy(offset.data(), p + 2 * nt * 8, nt * 8);
    p += 24 * nt;
    // segments inside the used slots and not overlapping
    std::vector<std::pair<i64, i64>> seg(nt);
    for (uint64_t t = 0; t < nt; ++t) {
      i64 s = split[t], o = offset[t];
      bool ok = s >= 0 && s <= T_ && o >= 0 && o <= static_cast<i64>(used);
      i64 end = ok ? o + (s + 1) + B_ * (T_ - s) : 0;
      if (!ok || end > static_cast<i64>(used))
        throw std::invalid_argument(path + ": inconsistent tree table (split steps / segment offsets out of range)");
      seg[t] = {o, end};
    }
    std::sort(seg.begin(), seg.end());
    for (size_t t = 1; t < seg.size(); ++t)
      if (seg[t].first < seg[t - 1].second)
        throw std::invalid_argument(path + ": inconsistent tree table (split steps / segment offsets out of range)");
    // commit
    py::gil_scoped_release nogil;
    std::unique_lock lk(mu_);
    std::copy(prompt.begin(), prompt.end(), tree_prompt_.begin());
    std::copy(split.begin(), split.end(), tree_split_.begin());
    std::copy(offset.begin(), offset.end(), tree_offset_.begin());
    std::memcpy(reward_.data(), p, n * 4);
    std::memcpy(adv_.data(), p + n * 4, n * 4);
    std::memcpy(logp_.data(), p + n * 8, n * T_ * 4);
    p += n * 8 + n * T_ * 4;
    std::memcpy(mem_, p, used * nbytes_);
    // the file stores no per-slot written flags: every slot it carries counts as written
    std::fill(written_.begin(), written_.begin() + used, 1);
    num_trees_ = static_cast<i64>(nt);
    used_slots_ = static_cast<i64>(used);
  }

 private:
  template <class V, class F>
  py::array_t<V> per_traj(const IdArray& ids, F&& get) const {
    std::shared_lock lk(mu_);
    i64 m = ids.size();
    check_ids(ids.data(), m);
    py::array_t<V> out(m);
    V* o = out.mutable_data();
    for (i64 k = 0; k < m; ++k) o[k] = get(ids.data()[k]);
    return out;
  }

  void set(std::vector<float>& target, const char* name, const IdArray& ids, const F32Array& v) {
    std::unique_lock lk(mu_);
    i64 m = ids.size();
    check_len(name, v.size(), m);
    check_ids(ids.data(), m);
    for (i64 k = 0; k < m; ++k) target[ids.data()[k]] = v.data()[k];
  }

  std::vector<uint8_t> header(i64 nt, i64 used) const {
    std::vector<uint8_t> h;
    auto put = [&h](const void* p, size_t n) { h.insert(h.end(), (const uint8_t*)p, (const uint8_t*)p + n); };
    auto u64 = [&put](uint64_t v) { put(&v, 8); };
    put(kMagic, 8);
    put(&kVersion, 4);
    put(&dtype_code_, 4);
    u64(elem_size_);
    u64(shape_.size());
    for (i64 d : shape_) u64(d);
    i64 n = nt * B_;
    u64(T_), u64(max_trees_), u64(B_), u64(nt), u64(used);
    u64(24 * nt + 8 * n + 4 * n * T_ + used * nbytes_);
    return h;
  }

  static std::vector<uint8_t> read_file(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      if (err == ENOENT) throw std::invalid_argument(path + ": no such arena file");
      throw std::runtime_error("load: cannot open " + path + ": " + std::strerror(err));
    }
    struct stat st {};
    ::fstat(fd, &st);
    std::vector<uint8_t> data(static_cast<size_t>(st.st_size));
    size_t got = 0;
    while (got < data.size()) {
      ssize_t r = ::read(fd, data.data() + got, data.size() - got);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    ::close(fd);
    data.resize(got);
    return data;
  }

  std::vector<i64> shape_;
  i64 elem_size_, nbytes_ = 0;
  uint32_t dtype_code_;
  i64 T_, max_trees_, B_, capacity_slots_ = 0;
  size_t alloc_bytes_ = 0;
  uint8_t* mem_ = nullptr;
  i64 num_trees_ = 0, used_slots_ = 0;
  std::vector<i64> tree_prompt_, tree_split_, tree_offset_;
  std::vector<float> reward_, adv_, logp_;
  std::vector<uint8_t> written_;  // per slot: stored by write_latents / mark_written since its tree was added
  int threads_ = 1;
  mutable std::shared_mutex mu_;  // gathers share it; writes, add_trees, reset and load take it exclusively
};

}  // namespace

void register_arena(py::module_& m) {
  py::class_<Arena>(m, "Arena", py::buffer_protocol(),
                    "Trajectory arena core: layout, indices and metadata of branch trees in one host block.\n"
                    "Exposes the whole block (capacity_slots * latent_nbytes bytes) via the buffer protocol.")
      .def(py::init<std::vector<i64>, i64, uint32_t, i64, i64, i64, int>(), py::arg("shape"),
           py::arg("elem_size"), py::arg("dtype_code"), py::arg("num_steps"), py::arg("max_trees"),
           py::arg("branches"), py::arg("num_threads") = 0)
      .def_buffer([](Arena& a) {
        return py::buffer_info(a.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(a.data_bytes())}, {py::ssize_t{1}}, false);
      })
      .def_property_readonly("latent_nbytes", &Arena::latent_nbytes)
      .def_property_readonly("capacity_slots", &Arena::capacity_slots)
      .def_property_readonly("used_slots", &Arena::used_slots)
      .def_property_readonly("num_trees", &Arena::num_trees)
      .def_property_readonly("num_trajectories", &Arena::num_trajectories)
      .def_property("num_threads", &Arena::threads, &Arena::set_threads)
      .def_property_readonly("data_ptr", [](const Arena& a) { return reinterpret_cast<uintptr_t>(a.data()); })
      .def("slots", &Arena::slots, py::arg("ids"), py::arg("latent_idx"))
      .def("add_trees", &Arena::add_trees, py::arg("prompt_ids"), py::arg("split_step"))
      .def("reset", &Arena::reset)
      .def("write_latents", &Arena::write_latents, py::arg("ids"), py::arg("latent_idx"), py::arg("src"))
      .def("mark_written", &Arena::mark_written, py::arg("slots"))
      .def("read_latents", &Arena::read_latents, py::arg("ids"), py::arg("latent_idx"), py::arg("out"))
      .def("write_logprobs", &Arena::write_logprobs, py::arg("ids"), py::arg("step"), py::arg("values"))
      .def("set_rewards", &Arena::set_rewards, py::arg("ids"), py::arg("values"))
      .def("set_advantages", &Arena::set_advantages, py::arg("ids"), py::arg("values"))
      .def("prompt_ids", &Arena::prompt_ids, py::arg("ids"))
      .def("split_steps", &Arena::split_steps, py::arg("ids"))
      .def("rewards", &Arena::rewards, py::arg("ids"))
      .def("advantages", &Arena::advantages, py::arg("ids"))
      .def("logprobs", &Arena::logprobs, py::arg("ids"))
      .def("gather", &Arena::gather, py::arg("ids"), py::arg("steps"), py::arg("out_xt"), py::arg("out_xprev"),
           py::arg("out_logp"), py::arg("out_reward"), py::arg("out_adv"), py::arg("out_step"),
           py::arg("out_prompt"))
      .def("save", &Arena::save, py::arg("path"))
      .def("load", &Arena::load, py::arg("path"));
}

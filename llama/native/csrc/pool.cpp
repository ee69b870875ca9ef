// A thread pool of our own, the alternative to sharing torch's OpenMP team. Kept only to
// measure the choice (benchmarks/threads.py): workers spin briefly for the next job, then
// sleep, as such pools do. Selected with llama_native_set_pool(1).
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "linear.h"

namespace llama {
namespace {

class Pool {
  public:
    explicit Pool(int threads) : size_(threads) {
        for (int i = 1; i < size_; i++) workers_.emplace_back([this, i] { work(i); });
    }

    ~Pool() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
            generation_++;
        }
        wake_.notify_all();
        for (auto& t : workers_) t.join();
    }

    int size() const { return size_; }

    void run(const void* ctx, int64_t count, RangeFn fn) {
        ctx_ = ctx; count_ = count; fn_ = fn;
        pending_.store(size_ - 1);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            generation_++;
        }
        wake_.notify_all();
        share(0);
        while (pending_.load(std::memory_order_acquire) != 0) {
        }
    }

  private:
    void share(int id) const {
        const int64_t per = (count_ + size_ - 1) / size_, begin = id * per;
        const int64_t end = std::min(count_, begin + per);
        if (begin < end) fn_(ctx_, begin, end);
    }

    void work(int id) {
        uint64_t seen = 0;
        for (;;) {
            for (int spin = 0; spin < 200000 && generation_.load(std::memory_order_acquire) == seen; spin++) {
#ifdef LLAMA_X86
                _mm_pause();
#endif
            }
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load() != seen; });
                seen = generation_.load();
                if (stop_) return;
            }
            share(id);
            pending_.fetch_sub(1, std::memory_order_release);
        }
    }

    int size_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    bool stop_ = false;
    const void* ctx_ = nullptr;
    int64_t count_ = 0;
    RangeFn fn_ = nullptr;
};

Pool* own_pool = nullptr;

}  // namespace

bool run_on_own_pool(const void* ctx, int64_t count, RangeFn fn) {
    if (own_pool == nullptr) return false;
    own_pool->run(ctx, count, fn);
    return true;
}

}  // namespace llama

extern "C" int llama_native_set_pool(int threads) {
    delete llama::own_pool;
    llama::own_pool = threads > 1 ? new llama::Pool(threads) : nullptr;
    return 0;
}

// cuda_emulator.h -- lets a CUDA C kernel file compile as plain C++ so it can run on the CPU.
//
// minicnn.testing.emulator compiles each kernels/*.cu file with
//   g++ -std=c++17 -include cuda_emulator.h -Dscalar_t=... -Dacc_t=... -x c++ file.cu wrappers.cpp
// and the generated wrappers run each kernel once per thread of a launch after setting the
// built-in variables below. Only what minicnn's kernels use is emulated: 1-D launches, static
// __shared__ arrays, __syncthreads(); no atomics, no warp functions, no dynamic shared memory
// (those fail to compile rather than run wrongly).
//
// Two ways of running a block, picked per file by the emulator (from the file's source text):
// - one thread at a time (the default): each thread's call runs to its end before the next
//   starts. Fast, and all that kernels without shared memory and barriers need. Here
//   __shared__ and __syncthreads() are compile errors.
// - cooperative (-DMINICNN_EMU_COOPERATIVE, for files that use __shared__ or __syncthreads):
//   the threads of a block are fibers on one OS thread (see "Cooperative blocks" below).
#pragma once

#ifdef MINICNN_EMU_COOPERATIVE
// Switching between fibers jumps from one stack to another with _longjmp. With _FORTIFY_SOURCE
// (on by default in some distributions' compilers), glibc checks that a longjmp goes back up
// the current stack and aborts otherwise ("longjmp causes uninitialized stack frame").
#undef _FORTIFY_SOURCE
#endif

#include <cmath>  // expf, sqrt, ... which NVRTC provides as built-ins

// CUDA's math functions are overloaded in the global namespace (fma(float, float, float) is
// fmaf); the C library's are double only. std's overloads give the CUDA meaning.
using std::fma;

// Function and variable qualifiers: all code is ordinary host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// __restrict__ is a GNU C++ keyword already (g++ and clang++).

// The index types and the four built-in variables. A kernel reads them; the emulator's wrapper
// sets them before each call. thread_local: launches from several host threads do not mix.
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// Read-only cache loads are plain loads on the CPU.
template <typename T>
inline T __ldg(const T* p) { return *p; }

// Products rounded on their own, which nvcc never fuses into an fma (the emulator compiles with
// -ffp-contract=off, so g++ fuses nothing anyway).
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

#ifndef MINICNN_EMU_COOPERATIVE

// Threads run one at a time here: shared memory and barriers need the cooperative mode, which
// the emulator picks for every file whose source names them.
#define __syncthreads() \
    static_assert(false, "minicnn emulator: __syncthreads() outside the cooperative mode")
#define __shared__ \
    static_assert(false, "minicnn emulator: __shared__ outside the cooperative mode");

#else  // MINICNN_EMU_COOPERATIVE

// --- Cooperative blocks -----------------------------------------------------------------------
//
// Each thread of a block is a fiber: a stack of its own and a saved set of registers, run on
// the launching OS thread. The scheduler (emu::run_cooperative) runs a block in phases: every
// fiber of the block in turn (thread 0 first, or the last first when reversed) runs until it
// reaches __syncthreads() or returns from the kernel, then switches straight to the next fiber;
// the last one switches back to the scheduler. When every thread of the
// block waits at the same __syncthreads() the barrier is passed and the next phase begins; when
// all have returned the block is done. Anything else -- some threads returned while others wait,
// or threads waiting at different __syncthreads() -- is barrier divergence (undefined on a GPU,
// often a hang) and the launch fails with a message.
//
// Fibers are made once per OS thread with makecontext (again after a divergent launch left them
// inside the kernel) and then switched with _setjmp/_longjmp, which save and restore a few
// registers with no system call (swapcontext would also save and restore the signal mask, one
// system call per switch). After the kernel returns, a fiber waits for the next thread it is to
// run; the stacks are freed when the OS thread ends.
//
// __shared__ variables are static variables placed in the section "minicnn_shared"; the linker
// marks its ends (__start_/__stop_minicnn_shared), and the scheduler fills the whole section
// with 0xff bytes (NaN in float and double, -1 in integers) before each block, so a read before
// the block's own write shows. Being static, they are shared by the fibers; a mutex keeps two
// host threads from launching kernels of one library at once.

#include <csetjmp>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#define __shared__ static __attribute__((section("minicnn_shared")))
#define __syncthreads() emu::syncthreads(__LINE__)

extern "C" char __start_minicnn_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_minicnn_shared[] __attribute__((weak, visibility("hidden")));

namespace emu {

constexpr std::size_t kStackBytes = 64 * 1024;  // per fiber, below it one inaccessible guard page

enum State { kRunnable, kAtBarrier, kReturned };

struct Fiber {
    jmp_buf resume;     // where the fiber goes on when it is switched to
    unsigned int tid;   // the threadIdx.x it runs as
    State state;
    int line;           // source line of the __syncthreads() it waits at
};

// All the state of the fibers of one OS thread, in one thread_local object: one lookup of
// thread-local storage per use (each is a function call in a shared library). Trivially
// destructible, so that no initialization check runs on each use either.
struct Runtime {
    jmp_buf scheduler;              // where the last fiber of a phase jumps back to
    Fiber* fibers;                  // `size` fibers, made by make_fibers
    unsigned int size;
    bool ready;                     // false after a failed launch left fibers inside the kernel
    char* stacks;                   // the fibers' stacks, each after its guard page
    std::size_t stack_bytes;
    unsigned int phase_size;        // fibers taking part in the phase (blockDim.x)
    unsigned int next;              // position, in the phase's order, of the fiber to run next
    int reverse;                    // the order: thread 0 first, or the last thread first
    Fiber* current;                 // the fiber running
    void (*body)(void*);            // runs the kernel as thread current->tid
    void* body_arg;
    char message[512];              // what went wrong
};
inline thread_local Runtime rt;

// Frees the stacks when the OS thread ends; made the first time stacks are.
struct StackOwner {
    ~StackOwner() {
        if (rt.stacks) munmap(rt.stacks, rt.stack_bytes);
        delete[] rt.fibers;
    }
};
inline thread_local StackOwner stack_owner;

inline std::mutex shared_memory_lock;   // one launch at a time uses the static __shared__ memory

// Switch to the next fiber of the phase.
[[noreturn]] inline void resume_next(Runtime& r) {
    const unsigned int p = r.next++;
    Fiber* f = &r.fibers[r.reverse ? r.phase_size - 1 - p : p];
    r.current = f;
    threadIdx = uint3{f->tid, 0, 0};
    _longjmp(f->resume, 1);
}

// Leave fiber `self` (its state set) for the next fiber of the phase, or for the scheduler after
// the last one; returns when `self` is switched to again.
inline void yield(Runtime& r, Fiber* self) {
    if (_setjmp(self->resume)) return;
    if (r.next == r.phase_size) _longjmp(r.scheduler, 1);
    resume_next(r);
}

// Every fiber starts here (makecontext) and never returns: it runs the kernel once for each
// thread it is given, yielding after each.
inline void fiber_main() {
    Runtime& r = rt;                // a fiber always runs on the OS thread that made it
    Fiber* self = r.current;
    yield(r, self);                 // made: back to make_fibers
    for (;;) {
        r.body(r.body_arg);
        self->state = kReturned;
        yield(r, self);
    }
}

__attribute__((noinline)) inline void syncthreads(int line) {
    Runtime& r = rt;
    Fiber* self = r.current;
    self->state = kAtBarrier;
    self->line = line;
    yield(r, self);
    asm volatile("" ::: "memory");  // a compiler barrier too: other fibers wrote shared memory
}

// (Re)make the fibers, at least n of them: a stack each, entered once with setcontext so that it
// parks in fiber_main. Returns false (with the message set) if the memory cannot be had.
inline bool make_fibers(Runtime& r, unsigned int n) {
    static_cast<void>(&stack_owner);
    const std::size_t page = (std::size_t)sysconf(_SC_PAGESIZE);
    const std::size_t slot = page + kStackBytes;
    if (n > r.size) {
        if (r.stacks) munmap(r.stacks, r.stack_bytes);
        delete[] r.fibers;
        r.stacks = nullptr;
        r.fibers = nullptr;
        r.size = 0;
        void* memory = mmap(nullptr, n * slot, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (memory == MAP_FAILED) {
            std::snprintf(r.message, sizeof r.message, "cannot map %zu bytes of fiber stacks",
                          n * slot);
            return false;
        }
        r.stacks = static_cast<char*>(memory);
        r.stack_bytes = n * slot;
        r.fibers = new Fiber[n];
        r.size = n;
        for (unsigned int t = 0; t < n; ++t) mprotect(r.stacks + t * slot, page, PROT_NONE);
    }
    r.next = r.phase_size = 0;      // a new fiber's first yield goes back to the scheduler
    for (unsigned int t = 0; t < r.size; ++t) {
        ucontext_t context;
        getcontext(&context);
        context.uc_stack.ss_sp = r.stacks + t * slot + page;
        context.uc_stack.ss_size = kStackBytes;
        context.uc_link = nullptr;
        makecontext(&context, fiber_main, 0);
        r.current = &r.fibers[t];
        if (!_setjmp(r.scheduler)) setcontext(&context);
    }
    r.current = nullptr;
    r.ready = true;
    return true;
}

// The generated wrapper of a kernel of a cooperative file calls this: run fn(arg) as every
// thread of gx blocks of bx threads. Returns nullptr, or a message saying what went wrong.
inline const char* run_cooperative(unsigned int gx, unsigned int bx, int reverse,
                                   void (*fn)(void*), void* arg) {
    std::lock_guard<std::mutex> lock(shared_memory_lock);
    Runtime& r = rt;
    if ((bx > r.size || !r.ready) && !make_fibers(r, bx > r.size ? bx : r.size)) return r.message;
    r.body = fn;
    r.body_arg = arg;
    r.reverse = reverse;
    gridDim = dim3(gx);
    blockDim = dim3(bx);
    for (unsigned int nb = 0; nb < gx; ++nb) {
        const unsigned int b = reverse ? gx - 1 - nb : nb;
        blockIdx = uint3{b, 0, 0};
        if (__start_minicnn_shared != nullptr)
            std::memset(__start_minicnn_shared, 0xff,
                        (std::size_t)(__stop_minicnn_shared - __start_minicnn_shared));
        for (unsigned int t = 0; t < bx; ++t) {
            r.fibers[t].tid = t;
            r.fibers[t].state = kRunnable;
        }
        for (;;) {                  // one phase: every thread runs to a barrier or returns
            r.phase_size = bx;
            r.next = 0;
            if (!_setjmp(r.scheduler)) resume_next(r);     // back after the phase's last fiber
            r.current = nullptr;
            unsigned int returned = 0, first_wait = bx, other_wait = bx;
            for (unsigned int t = 0; t < bx; ++t) {
                const Fiber& f = r.fibers[t];
                if (f.state == kReturned) {
                    ++returned;
                } else if (first_wait == bx) {
                    first_wait = t;
                } else if (other_wait == bx && f.line != r.fibers[first_wait].line) {
                    other_wait = t;
                }
            }
            if (returned == bx) break;                          // the block is done
            if (returned == 0 && other_wait == bx) continue;    // all at one barrier: pass it
            r.ready = false;        // fibers are left inside the kernel: remake them next time
            const Fiber& w = r.fibers[first_wait];
            if (other_wait == bx) {
                std::snprintf(r.message, sizeof r.message,
                              "barrier divergence in block %u: %u of its %u threads returned from "
                              "the kernel while thread %u (and %u more) waits at __syncthreads() "
                              "on line %d",
                              b, returned, bx, w.tid, bx - returned - 1, w.line);
            } else {
                const Fiber& o = r.fibers[other_wait];
                std::snprintf(r.message, sizeof r.message,
                              "barrier divergence in block %u: thread %u waits at "
                              "__syncthreads() on line %d, thread %u at the one on line %d",
                              b, w.tid, w.line, o.tid, o.line);
            }
            return r.message;
        }
    }
    return nullptr;
}

}  // namespace emu

#endif  // MINICNN_EMU_COOPERATIVE

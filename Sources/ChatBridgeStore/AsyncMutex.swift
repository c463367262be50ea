import Synchronization

/// A fair asynchronous lock: callers run one at a time across suspension points, in arrival order within
/// their priority; urgent callers (acknowledging a platform request) go before background work.
final class AsyncMutex: Sendable {
    enum Priority {
        case urgent
        case background
    }

    private struct State {
        var locked = false
        var urgent: [CheckedContinuation<Void, Never>] = []
        var background: [CheckedContinuation<Void, Never>] = []
    }
    private let state = Mutex(State())

    /// Callers waiting for the lock.
    var waiting: Int { state.withLock { $0.urgent.count + $0.background.count } }

    func withLock<R: Sendable>(priority: Priority = .background, _ body: () async throws -> R) async throws -> R {
        await lock(priority)
        defer { unlock() }
        return try await body()
    }

    private func lock(_ priority: Priority) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let acquired = state.withLock { state -> Bool in
                if state.locked {
                    switch priority {
                    case .urgent: state.urgent.append(continuation)
                    case .background: state.background.append(continuation)
                    }
                    return false
                }
                state.locked = true
                return true
            }
            if acquired { continuation.resume() }
        }
    }

    private func unlock() {
        let next = state.withLock { state -> CheckedContinuation<Void, Never>? in
            if !state.urgent.isEmpty { return state.urgent.removeFirst() }
            if !state.background.isEmpty { return state.background.removeFirst() }
            state.locked = false
            return nil
        }
        next?.resume()
    }
}

import Foundation
import Logging
import Synchronization

/// Feeds a ``LiveReply`` from the model's deltas: always the whole text so far, at most one update per
/// `interval`, never two at once, the newest text winning over any it skipped. The first delta is shown at
/// once. ``close()`` stops without waiting out the pause, so the final text follows without delay.
///
/// An update that fails is not retried on its own (the next one carries the whole text); one that is not
/// retryable stops the updates (the final text still goes through ``LiveReply/finish(_:)``).
public final class LiveUpdates: Sendable {
    private enum Phase { case waiting, updating, pausing }
    private struct State {
        var text = ""
        var closed = false
        var phase = Phase.waiting
        var updates = 0
    }

    private let state = Mutex(State())
    private let wake: AsyncStream<Void>.Continuation
    private let task: Mutex<Task<Void, Never>?> = Mutex(nil)

    public init(reply: any LiveReply, interval: Duration, clock: any WallClock, logger: Logger) {
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        wake = continuation
        let runner = Task { [self] in
            var shown = ""
            for await _ in stream {
                let text = self.state.withLock { state -> String? in
                    guard !state.closed else { return nil }
                    state.phase = .updating
                    return state.text
                }
                guard let text else { break }
                // A trailing newline on an intermediate update makes a markdown card flicker.
                let visible = String(text.reversed().drop(while: \.isWhitespace).reversed())
                if visible.isEmpty || visible == shown {
                    self.state.withLock { $0.phase = .waiting }
                    continue
                }
                do {
                    try await reply.update(visible)
                    shown = visible
                    self.state.withLock { $0.updates += 1 }
                } catch let error as DeliveryError where !error.isRetryable {
                    logger.warning("live reply updates stopped; the final text is still sent", metadata: ["error": "\(error)"])
                    break
                } catch {
                    if Task.isCancelled { break }
                    logger.debug("a live reply update failed; the next one carries the whole text", metadata: ["error": "\(error)"])
                }
                let closed = self.state.withLock { state -> Bool in
                    state.phase = .pausing
                    return state.closed
                }
                if closed { break }
                try? await clock.sleep(for: interval)
                if self.state.withLock({ $0.closed }) { break }
                self.state.withLock { $0.phase = .waiting }
            }
        }
        task.withLock { $0 = runner }
    }

    /// Adds a piece of the answer.
    public func append(_ delta: String) {
        state.withLock { $0.text += delta }
        wake.yield()
    }

    /// Updates sent so far.
    public var updates: Int { state.withLock { $0.updates } }

    /// Stops: an update in progress completes, a pause is cut short. Returns once nothing more is sent.
    public func close() async {
        let pausing = state.withLock { state -> Bool in
            state.closed = true
            return state.phase == .pausing
        }
        let runner = task.withLock { $0 }
        if pausing { runner?.cancel() }
        wake.yield()
        wake.finish()
        await runner?.value
    }
}

import Foundation
import Logging
import Synchronization

/// Feeds a ``LiveReply`` from the model's deltas: always the whole text so far, at most one update per
/// `interval`, never two at once, the newest text winning over any it skipped. The first delta is shown at
/// once. ``close()`` returns once the pause after the last update is over, so the final text that follows
/// keeps the pace too.
///
/// An update that fails is not retried on its own (the next one carries the whole text); one that is not
/// retryable stops the updates (the final text still goes through ``LiveReply/finish(_:)``).
public final class LiveUpdates: Sendable {
    private struct State {
        var text = ""
        var closed = false
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
                let text = self.state.withLock { $0.closed ? nil : $0.text }
                guard let text else { break }
                // A trailing newline on an intermediate update makes a markdown card flicker.
                let visible = String(text.reversed().drop(while: \.isWhitespace).reversed())
                if visible.isEmpty || visible == shown { continue }
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
                try? await clock.sleep(for: interval)
                if self.state.withLock({ $0.closed }) { break }
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

    /// Stops: an update in progress completes and its pause is waited out. Returns once nothing more is sent.
    public func close() async {
        state.withLock { $0.closed = true }
        let runner = task.withLock { $0 }
        wake.yield()
        wake.finish()
        await runner?.value
    }
}
